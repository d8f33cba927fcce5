def main():
    print("charles")
