"""One small error hierarchy: the CLI turns any HybridError into one red line and exit code 2."""


class HybridError(Exception):
    """Base of every error the user can cause (bad file, bad flag, impossible plan)."""


class ConfigError(HybridError):
    """config.json (or another settings file) is missing a key or holds an impossible value."""


class CheckpointError(HybridError):
    """A checkpoint file is missing, truncated, corrupt, or disagrees with config.json."""


class PlanError(HybridError):
    """A placement plan cannot be built or applied."""


class GenerationError(HybridError):
    """Generation cannot proceed (context overflow, bad prompt ids)."""


class EngineError(HybridError):
    """The generation engine has stopped (a failure that was not one request's own, or shutdown): nothing more
    can run on it."""
