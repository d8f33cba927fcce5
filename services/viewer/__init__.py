"""The viewer: the seed's stream layout as a web page, fed by the ``console.*`` topic family.

Every service that wants to be seen publishes ``Console(service, state, images)`` on
``console.<instance>`` (~5 Hz; a last-value topic, so a viewer that starts late shows everyone at once).
A player also publishes its camera pictures on ``camera.<instance>`` at frame rate (up to 30 Hz).
The viewer keeps the newest console and pictures of each instance (:mod:`charles.viewer.board`), serves
the page, its JSON and the pictures (:mod:`charles.viewer.web`), pushes every new picture to the pages
streaming it through a bounded queue each (:mod:`charles.viewer.stream`), and the page draws the six
tiles in the browser. ``charles clip`` (:mod:`charles.viewer.clip`) writes the cinematic camera to MP4.
README.md beside this file is the contract: which keys and images each service sends.

Imports: core and charles.proto; no other service.
"""
