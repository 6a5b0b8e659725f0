"""Checking Hub access before a run starts."""

from __future__ import annotations

import logging

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)


HUB_HOW_TO = (
    "Log in with `hf auth login` (or set HF_TOKEN, or pass --hub_token) with a write token, or drop --push_to_hub "
    "and upload the output directory later with `hf upload <user>/<model-name> <output_dir>`."
)


def check_hub_access(hub_model_id: str | None = None, token: str | None = None) -> dict:
    """Check that `--push_to_hub` can work, before any training time is spent on a run that could not be uploaded.

    Raises `OSError` with what failed and how to fix it when the Hub is in offline mode (`HF_HUB_OFFLINE=1`), when no
    token is found (`--hub_token`, `HF_TOKEN` or `hf auth login`), when the Hub (`HF_ENDPOINT`) cannot be reached,
    when it rejects the token, or when the token is read-only. Otherwise returns `HfApi.whoami`'s answer. The
    repository itself is created by the Trainer (`create_repo(exist_ok=True)`) when it starts.

    Args:
        hub_model_id (`str`, *optional*): the repository the run will push to, named in the messages.
        token (`str`, *optional*): the token to check; defaults to the one `huggingface_hub.get_token` finds.
    """
    target = f"push to {hub_model_id}" if hub_model_id else "push to the Hub"
    if constants.is_offline_mode():
        raise OSError(
            f"--push_to_hub needs the Hub, but the Hub is in offline mode (HF_HUB_OFFLINE=1), so the run could not "
            f"{target}. Unset HF_HUB_OFFLINE, or drop --push_to_hub."
        )
    token = token or get_token()
    if not token:
        raise OSError(f"--push_to_hub needs a Hub token to {target}, and none was found. {HUB_HOW_TO}")
    api = HfApi()
    try:
        who = api.whoami(token=token)
    except OfflineModeIsEnabled as err:
        raise OSError(
            f"--push_to_hub: the Hub is in offline mode ({err}). Unset HF_HUB_OFFLINE, or drop --push_to_hub."
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        what = "rejected the token" if status == 401 else f"answered HTTP {status}"
        raise OSError(f"--push_to_hub: the Hub at {api.endpoint} {what} ({err}). {HUB_HOW_TO}") from err
    except Exception as err:  # connection refused, DNS, timeouts, proxies: httpx and OSError both
        raise OSError(
            f"--push_to_hub: could not reach the Hub at {api.endpoint} ({type(err).__name__}: {err}). Check the "
            f"network (and HF_ENDPOINT), or drop --push_to_hub and upload the output directory later with "
            f"`hf upload <user>/<model-name> <output_dir>`."
        ) from err
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise OSError(
            f"--push_to_hub: the Hub token of {who.get('name')} is read-only and cannot {target}. {HUB_HOW_TO}"
        )
    logger.info("Hub reachable at %s as %s; the run will %s.", api.endpoint, who.get("name"), target)
    return who
