from simpo_lite.cli import main

if __name__ == "__main__":
    main()
