import sys

# While `python -m src.<command>` looks for its module, sys.argv[0] is "-m": a command is starting (a
# program that imports the package keeps its own excepthook).
if sys.argv[:1] == ["-m"]:
    from src.errors import exit_without_the_packages, uncaught_ctrl_c_says_one_line
    uncaught_ctrl_c_says_one_line()
    exit_without_the_packages()
