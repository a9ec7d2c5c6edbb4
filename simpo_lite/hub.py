"""Publishing an export: the Hub token and upload, and the model card (README.md with Hub metadata).

The token comes from HF_TOKEN or the cached login (huggingface_hub.get_token) and only ever goes into
HfApi's request headers: it is never written to a file or printed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from simpo_lite.config import Config
from simpo_lite.errors import UserError, first_line
from simpo_lite.files import looks_like_local_path, write_text

# The bundled models' Hub ids, for the card's base_model and the adapter's base_model_name_or_path
# (the run itself only knows the local folder the bundled GGUF was converted into).
BUNDLED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---- token, network and upload ---------------------------------------------------------------

def check_push_access(repo_id: str) -> str:
    """The token, after checking that it exists, is accepted and may write; raises UserError otherwise."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--push-to-hub '{repo_id}' is not a valid repo id ({first_line(err)}): use NAME or "
                        f"USER_OR_ORG/NAME") from None
    token = get_token()
    if not token:
        raise UserError("--push-to-hub needs a Hugging Face token and none was found: set HF_TOKEN or run "
                        "'hf auth login'")
    who = _hub_call(lambda: HfApi(token=token).whoami(), "check the token")
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise UserError("--push-to-hub: the Hugging Face token is read-only: create a token with write access "
                        "at https://huggingface.co/settings/tokens and set HF_TOKEN to it")
    return token


def push_folder(folder: Path, repo_id: str, token: str, private: bool, message: str) -> str:
    """Create the repo if needed and upload the folder in one commit; return the repo URL."""
    from huggingface_hub import HfApi

    from simpo_lite.run_folder import EXPORT_CONFIG

    api = HfApi(token=token)
    try:
        _hub_call(lambda: _ensure_repo(api, repo_id, private), "create the repository")
        _hub_call(lambda: api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message,
                                            ignore_patterns=[EXPORT_CONFIG]), "upload the files")
    except UserError as err:
        raise UserError(f"exported to {folder} but not pushed: {err}") from err.__cause__
    return f"{api.endpoint}/{repo_id}"


def _ensure_repo(api, repo_id: str, private: bool) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        # None rather than False: without --private the account's default visibility applies.
        api.create_repo(repo_id, private=True if private else None)
        return
    except HfHubHTTPError as err:
        if _status(err) != 409:  # 409: it exists already
            raise
    # The Hub ignores `private` for an existing repo: never upload a --private export to a public one.
    if private and not api.repo_info(repo_id).private:
        raise UserError(f"repository '{repo_id}' already exists and is public, and --private cannot change that: "
                        f"make it private on the Hub first, or push to a new repo id")


def _hub_call(fn, doing: str):
    """Run one Hub call; turn HTTP refusals and network failures into one-line UserErrors."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn()
    except HfHubHTTPError as err:
        raise UserError(f"the Hub refused to {doing} (HTTP {_status(err)}): {first_line(err)}; check the "
                        f"repo id and that the token may write to it") from err
    except _network_errors() as err:
        raise UserError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to {doing}: {first_line(err)}; "
                        f"check the network connection (and HF_ENDPOINT, HF_HUB_OFFLINE)") from err


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests);
    ConnectionError also covers its OfflineModeIsEnabled."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _status(err) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


# ---- metadata --------------------------------------------------------------------------------

def hub_base_model(name_or_path: str) -> str | None:
    """The base model's Hub id, or None for a local folder."""
    if name_or_path in BUNDLED_HUB_IDS:
        return BUNDLED_HUB_IDS[name_or_path]
    if looks_like_local_path(name_or_path) or not HUB_ID.match(name_or_path):
        return None
    return name_or_path


def hub_datasets(cfg: Config) -> list[str]:
    """The training and eval data when they are Hub datasets (not 'demo' or a local file)."""
    from simpo_lite.data.sources import BUILDERS

    found = []
    for source in (cfg.data.source, cfg.data.eval_source):
        if (source and HUB_ID.match(source) and not looks_like_local_path(source, tuple(BUILDERS))
                and source not in found):
            found.append(source)
    return found


def rewrite_adapter_base(adapter_config: Path, name_or_path: str) -> None:
    """Point an exported adapter at the base's Hub id, so it loads anywhere, not only on this machine."""
    hub_id = hub_base_model(name_or_path)
    if hub_id is None:
        return
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = hub_id
    write_text(adapter_config, json.dumps(data, indent=2) + "\n")


def write_model_card(folder: Path, cfg: Config, summary: dict | None, result) -> None:
    from simpo_lite.card import render_card

    write_text(folder / "README.md", render_card(cfg, summary, result, hub_base_model(cfg.model.name_or_path),
                                                 hub_datasets(cfg)))
