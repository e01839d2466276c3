"""Where ppdiffusers 0.29 would load a teacher given as a hub id, checked before any model loads.

By default ppdiffusers downloads hub ids from Baidu's object storage (BOS, ``PPNLP_ENDPOINT``, default
https://bj.bcebos.com/paddlenlp) into ``<PPNLP_HOME or ~/.cache/paddlenlp>/ppdiffusers/<id>/``, a plain
diffusers-layout folder; ``FROM_HF_HUB=1`` switches to huggingface.co (``HF_ENDPOINT``, Hugging Face's cache),
``FROM_AISTUDIO=1`` to Baidu AI Studio. Its BOS requests have no timeout, so without network a run could stall
for a long time and then end in a long traceback. ``check_hub_teacher`` looks at the cache and otherwise asks
the source for ``model_index.json`` (a HEAD request with a timeout, nothing downloaded).
"""
from __future__ import annotations

import os
import re

PROBE_TIMEOUT_S = 15
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubTeacherUnavailable(Exception):
    """One line: where ppdiffusers would have looked, and how to pass a local folder instead."""


def hub_source(repo_id: str) -> tuple:
    """(source name, URL of the id's model_index.json or None, the cache ppdiffusers reads, cached?)."""
    from ppdiffusers.utils import constants
    from ppdiffusers.utils.download_utils import ppdiffusers_bos_url

    if constants.FROM_AISTUDIO:
        return "Baidu AI Studio (FROM_AISTUDIO=1)", None, "AI Studio's cache", False
    if constants.FROM_HF_HUB:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(repo_id, "model_index.json", cache_dir=constants.DIFFUSERS_CACHE), str)
        url = f"{constants.HUGGINGFACE_CO_RESOLVE_ENDPOINT}/{repo_id}/resolve/main/model_index.json"
        return "huggingface.co (FROM_HF_HUB=1)", url, constants.DIFFUSERS_CACHE, cached
    folder = os.path.join(constants.PPDIFFUSERS_CACHE, repo_id)
    cached = os.path.isfile(os.path.join(folder, "model_index.json"))
    return "Baidu BOS (ppdiffusers' default)", ppdiffusers_bos_url(repo_id, "model_index.json"), folder, cached


def _probe(url: str, huggingface: bool):
    """None if ``url`` answers, else what went wrong (HEAD only, with a timeout; HF requests carry the
    user's stored token, as ppdiffusers' would)."""
    import requests

    try:
        if huggingface:
            from huggingface_hub import get_hf_file_metadata
            from huggingface_hub.utils import GatedRepoError

            try:
                get_hf_file_metadata(url, timeout=PROBE_TIMEOUT_S)
            except GatedRepoError:
                return "refused access (gated: accept the model's licence on its page, then huggingface-cli login)"
        else:
            status = requests.head(url, timeout=PROBE_TIMEOUT_S, allow_redirects=True).status_code
            if status != 200:
                return f"answered HTTP {status}"
    except OSError as error:  # requests' errors, huggingface_hub's HTTP and offline-mode errors
        return f"failed ({type(error).__name__})"
    return None


def check_hub_teacher(repo_id: str, flag: str = "--pretrained_teacher_model") -> None:
    """Return if ``repo_id`` is a local path or not a hub id, or if ppdiffusers can get it (cached, or its
    source answers); else raise one line."""
    if os.path.exists(repo_id) or not HUB_ID.match(repo_id):
        return
    name, url, cache, cached = hub_source(repo_id)
    if url is None or cached:  # AI Studio: ppdiffusers' own error is all there is
        return
    problem = _probe(url, huggingface="huggingface" in name)
    if problem is None:
        return
    raise HubTeacherUnavailable(
        f"{flag} {repo_id}: not a local folder and not in ppdiffusers' cache ({cache}); asking its source {name} "
        f"{problem} ({url}). Download the model where there is network and pass its folder: "
        f"{flag} /path/to/folder (README: Set-up, SD3 weights)")
