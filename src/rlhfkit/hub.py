"""Whether the Hugging Face hub can be used now: the checks that let a missing model or dataset
fail in one line at once, instead of after transformers' or datasets' retries."""

from __future__ import annotations

import os


def hub_unreachable() -> str:
    """Why the Hugging Face hub cannot be used now ("" when it can): HF_HUB_OFFLINE set, or its
    endpoint not reachable within a few seconds."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return "" if reachable(endpoint) else f"{endpoint} cannot be reached"


def offline(*more: str) -> bool:
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE (or one of the variables ``more``) is set true."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *more))


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host (or the HTTPS proxy in use) opens within ``timeout``."""
    import socket
    from urllib.parse import urlparse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname or "", port), timeout=timeout).close()
        return True
    except OSError:
        return False
