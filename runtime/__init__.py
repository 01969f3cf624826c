"""graphc.runtime: runs built programs (numpy backend) and loads artifacts, without the compiler.

Nothing here imports the front end or lark: a built artifact runs with numpy and the IR alone.
"""
from graphc.runtime.artifact import save_artifact
from graphc.runtime.program import ParamInfo, Program, load_artifact


def load_run(path, backend: str | None = None) -> Program:
    """The trained program of a run folder (graphc.runtime.runs.load_run)."""
    from graphc.runtime.runs import load_run as load
    return load(path, backend)


__all__ = ["Program", "ParamInfo", "load_artifact", "load_run", "save_artifact"]
