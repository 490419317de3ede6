"""Installed, medmoe is this folder as a package: `import medmoe` gives the model file's names
(medmoe.py, here medmoe.medmoe) and the other files are its modules (medmoe.data, medmoe.train,
medmoe.cli, ...), so nothing of ours sits at the top level of site-packages. In the repository,
medmoe.py itself is `medmoe` and makes this folder its package (see its __path__)."""

import os
import signal
import sys
import threading


def abort(signum, frame):
    """Ctrl-C while the `medmoe` command is still importing (torch alone takes seconds): one line,
    as Click ends an interrupted command, not a traceback from deep inside an import."""
    os.write(2, b"\nAborted!\n")
    os._exit(130)


# Only for the command, only in the main thread, and only over Python's own handler: a program
# that imports medmoe keeps its Ctrl-C. The command's Group.main puts Python's handler back.
command = os.path.basename(sys.argv[0]) == "medmoe" and threading.current_thread() is threading.main_thread()
if command and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, abort)

from .medmoe import *  # noqa: E402, F403
