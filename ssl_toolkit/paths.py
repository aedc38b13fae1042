"""Paths as users write them in recipes and options: ``~`` and environment variables expanded."""

import os


def expand(path: str) -> str:
    """``~/data`` and ``$SCRATCH/runs`` as a shell expands them, which it does not in a recipe's YAML, in quotes or
    (``~``) after ``--option=``. It is the rule of Lightning's TensorBoardLogger for its log folder: without it, a
    ``save_dir: $SCRATCH/runs`` put the logs there and the checkpoints in a folder named ``$SCRATCH`` here. A
    variable that is not set stays as written.

    Example:
        >>> os.environ["SSL_TOOLKIT_DOC"] = "/scratch/me"
        >>> expand("$SSL_TOOLKIT_DOC/runs"), expand("~") == os.path.expanduser("~"), expand("$NOT_SET_ANYWHERE/x")
        ('/scratch/me/runs', True, '$NOT_SET_ANYWHERE/x')
    """
    return os.path.expanduser(os.path.expandvars(path))
