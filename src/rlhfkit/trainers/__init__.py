"""One small file per algorithm; the shared loop machinery lives in ``common``."""
