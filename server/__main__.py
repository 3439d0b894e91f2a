"""`python -m vlmserve ...`: the same commands as the `vlmserve` console script."""

from vlmserve.cli import main

if __name__ == "__main__":
    main()
