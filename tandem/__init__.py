"""tandem: giant Mixture-of-Experts language models on one machine.

Packages, top to bottom (imports only go downward): cli -> runtime -> models | weights -> layers
-> ops. `tandem.LLM` is the Python API; `tandem` on the command line is `tandem.cli`.
"""


def __getattr__(name: str):
    # Lazy: importing the package does no work until the API is used.
    if name == "LLM":
        from tandem.runtime.llm import LLM

        return LLM
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
