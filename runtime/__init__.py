"""graphc.runtime: runs built programs (numpy backend) and loads artifacts, without the compiler.

Nothing here imports the front end or lark: a built artifact runs with numpy and the IR alone.
"""
from graphc.runtime.artifact import load_artifact, save_artifact
from graphc.runtime.program import ParamInfo, Program

__all__ = ["Program", "ParamInfo", "load_artifact", "save_artifact"]
