"""The broker: the central server (XSUB/XPUB forwarding, last values, the config service, CURVE); see
broker.py.

Imports: core (charles.config, charles.runtime, ...) and charles.proto; no other service.
"""
