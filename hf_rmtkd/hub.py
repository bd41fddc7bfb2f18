"""Sharing compressed models on the Hub: one commit with weights, config, model code, card and spectrum plots."""

from __future__ import annotations

import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi

from .model_card import build_model_card, spectrum_plots


def write_spectrum_plots(model, folder: str | Path) -> list[str]:
    """Plot the spectra recorded on `model` (`model.rmtkd_spectra`) into `folder/spectra/`.

    Returns:
        The PNG paths relative to `folder`, sorted.
    """
    from .plotting import plot_spectrum

    spectra = getattr(model, "rmtkd_spectra", None) or {}
    if spectra:
        out = Path(folder) / "spectra"
        out.mkdir(parents=True, exist_ok=True)
        for site in spectra.values():
            plot_spectrum(site, out)
    return spectrum_plots(folder)


def push_model_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: bool | str | None = None,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    model_card_kwargs: dict | None = None,
    **commit_kwargs,
) -> CommitInfo:
    """Save `model` to a temporary folder with its card and plots, and upload the folder as one commit.

    `commit_kwargs` (`commit_message`, `commit_description`, `revision`, `create_pr`) go to `HfApi.upload_folder`.
    The local model is never modified; a commit is atomic on the Hub, so a failed upload leaves the remote repository
    as it was. See [`RMTKDPreTrainedModel.push_to_hub`].
    """
    api = HfApi(token=token if isinstance(token, str) else None)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit_kwargs["commit_message"] = commit_kwargs.get("commit_message") or "Upload RMT-KD compressed model"
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        plots = write_spectrum_plots(model, folder)
        card = build_model_card(model, repo_id=repo_id, plots=plots, tags=tags, **(model_card_kwargs or {}))
        card.save(Path(folder) / "README.md")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, **commit_kwargs)
