"""m2rec-push: publish a trained M2Rec run folder on the Hugging Face Hub.

    m2rec-push --model runs/ml-1m/best --repo-id someone/m2rec-ml-1m [--private] [--revision R] [--dry-run]

1. Read the run folder (`save_pretrained` output + item_id_map.json + training_info.json) and check it.
2. Build the repository folder: the model is loaded with this package's class and written again with
   `save_pretrained` (with its item vocabulary and the sequential-recommendation pipeline, as `m2rec-train` writes
   them), rather than copied. That way the folder gets exactly model.safetensors (one copy of the tied weights,
   nothing pickled), a fresh config.json with `auto_map` and `custom_pipelines`, tokenizer_config.json, and the
   complete current set of code files, and nothing else that happens to lie in the run folder. Then
   item_id_map.json (byte for byte), training_info.json and README.md.
3. Verify it (hub_upload.verify): the code files are byte-identical to the installed package's, they import only
   what they may, a fresh offline `AutoModel.from_pretrained(folder, trust_remote_code=True)` scores like the
   source model, and the folder's pipeline recommends the source model's raw ids.
4. Upload with huggingface_hub (create_repo, create_branch for --revision, upload_folder). --dry-run stops before.

Nothing from the run folder is ever executed: its weights are read with the installed package's class, and a run
folder whose own code files differ from the installed package's is refused before anything is built (the code that
measured its metrics is not the code that would be published, and running it to compare could run anything).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .model_card import build_model_card, is_movielens, resolve_license
from .verify import INSTALLED_CODE, VerificationError, code_differing_from_installed, verify_folder

RUN_FILES = ("config.json", "model.safetensors", "item_id_map.json", "training_info.json")


class PushError(Exception):
    """A problem the user has to fix; the message says what and where."""


class UploadError(PushError):
    """The Hub could not be reached or refused a request; the repository may exist already, without the files."""


# ---------------------------------------------------------------------------------------------------- run folder


def read_run_folder(model_dir):
    """(config, training_info, item_id_map) of a run folder, after checking that they fit together and that its code
    files (if any) are the installed package's (`load_source_model` checks the weights)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PushError(f"--model {model_dir}: no such directory")
    missing = [name for name in RUN_FILES if not (model_dir / name).is_file()]
    if "model.safetensors" in missing and any(model_dir.glob("*.bin")):
        raise PushError(f"{model_dir} holds pickle weights (*.bin) but no model.safetensors; only safetensors are "
                        f"published. Load the model and save_pretrained it again (safetensors is the default).")
    if missing:
        raise PushError(f"{model_dir} is not a complete run folder: missing {', '.join(missing)} (the trainer writes "
                        f"save_pretrained's files plus item_id_map.json and training_info.json into best/)")
    check_run_code(model_dir)
    config = _read_json(model_dir / "config.json")
    training_info = _read_json(model_dir / "training_info.json")
    item_id_map = _read_json(model_dir / "item_id_map.json")
    num_items = config.get("num_items")
    check_item_id_map(item_id_map, num_items)
    if training_info.get("num_items") not in (None, num_items):
        raise PushError(f"training_info.json says num_items={training_info['num_items']} but config.json says "
                        f"{num_items}: the two files come from different runs")
    return config, training_info, item_id_map


def check_run_code(model_dir):
    """Refuses a run folder whose code files differ from the installed package's, naming them.

    Comparing by running that code would run whatever the folder holds (during a dry run too); and the run's metrics
    were measured with that code, not with the installed code that would be published.
    """
    differing = code_differing_from_installed(model_dir)
    if differing:
        model_dir = Path(model_dir)
        resave = (f"from m2rec import M2RecForSequentialRecommendation as M; "
                  f"M.from_pretrained('{model_dir}').save_pretrained('{model_dir}')")
        raise PushError(
            f"the code files {', '.join(differing)} in {model_dir} differ from the installed m2rec's "
            f"({INSTALLED_CODE}). m2rec-push never runs code from the folder it publishes, and the run's metrics were "
            f"measured with that code, not with the code that would be published. Either push with the m2rec version "
            f"that saved this run, or adopt the installed code: re-save the model with it (python -c \"{resave}\"), "
            f"check its metrics with m2rec-evaluate, and push again")


def _read_json(path):
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PushError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise PushError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def check_item_id_map(item_id_map, num_items):
    """The map must send raw ids to each model id 1..num_items exactly once, so every recommendation translates."""
    values = list(item_id_map.values())
    bad = [value for value in values if isinstance(value, bool) or not isinstance(value, int)
           or not 1 <= value <= num_items]
    if bad:
        raise PushError(f"item_id_map.json values must be model item ids 1..{num_items}; found {bad[:5]}")
    if len(set(values)) != len(values) or len(values) != num_items:
        raise PushError(f"item_id_map.json must map exactly one raw id to each model id 1..{num_items}; it has "
                        f"{len(values)} entries for {len(set(values))} distinct ids")


def load_source_model(model_dir):
    """The run's model, loaded strictly with this package's class (`m2rec.training.evaluate.load_trained_model`):
    unreadable, mismatched or non-finite weights are a PushError naming the file and the tensors."""
    from ..training.evaluate import load_trained_model

    try:
        return load_trained_model(model_dir).eval()
    except (OSError, ValueError) as error:
        raise PushError(str(error)) from None


# ---------------------------------------------------------------------------------------------------- build


def build_repo_folder(model_dir, folder, repo_id, license=None):
    """Write the repository folder; returns the source model (loaded with the installed package's class)."""
    from ..training.evaluate import save_model_folder

    model_dir, folder = Path(model_dir), Path(folder)
    _, training_info, item_id_map = read_run_folder(model_dir)
    model = load_source_model(model_dir)
    # config.json (auto_map, custom_pipelines), model.safetensors, the code files and the item vocabulary's
    # tokenizer_config.json; a run folder saved before the vocabulary loaded with AutoTokenizer gets it too.
    save_model_folder(model, item_id_map, folder)
    for name in ("item_id_map.json", "training_info.json"):
        shutil.copyfile(model_dir / name, folder / name)  # byte for byte: what the run wrote
    card = build_model_card(repo_id, model.config.to_dict(), training_info, item_id_map, license=license,
                            num_parameters=sum(p.numel() for p in model.parameters()))
    (folder / "README.md").write_text(card, encoding="utf-8")
    return model


def folder_files(folder):
    """[(relative path, size in bytes)] of every file upload_folder would send."""
    folder = Path(folder)
    return [(path.relative_to(folder).as_posix(), path.stat().st_size)
            for path in sorted(folder.rglob("*")) if path.is_file()]


def human_size(size):
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000


# ---------------------------------------------------------------------------------------------------- upload


def _network_errors():
    """Exception classes that mean 'could not talk to the server', for whichever HTTP library the client uses."""
    errors = [OSError]  # includes ConnectionError and huggingface_hub's OfflineModeIsEnabled
    for module_name in ("httpx2", "httpx", "requests"):
        module = sys.modules.get(module_name)
        if module is not None:
            error = getattr(module, "TransportError", None) or getattr(module, "RequestException", None)
            if error is not None:
                errors.append(error)
    return tuple(errors)


def upload(folder, repo_id, *, endpoint, token, private=False, revision=None, commit_message=None):
    """create_repo (exist_ok), create_branch for a revision other than main, upload_folder. Returns the commit URL.

    Raises UploadError with a one-line reason on HTTP errors, refused connections and offline mode.
    """
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # create_repo leaves an existing repository's visibility alone: never publish what was meant to stay private
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise UploadError(f"{repo_id} exists already and is public, but --private was given; make it private "
                              f"first (its settings page, or HfApi().update_repo_settings(repo_id, private=True)) "
                              f"or drop --private")
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                   commit_message=commit_message or "Upload M2Rec model with m2rec-push")
    except OfflineModeIsEnabled:
        raise UploadError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (--dry-run works offline)") \
            from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        reason = str(error).strip().splitlines()[0]
        raise UploadError(f"the Hub at {endpoint} refused the request (HTTP {status}): {reason}") from None
    except ValueError as error:  # huggingface_hub's answer to a model card the Hub's metadata check rejected
        raise UploadError(f"the Hub at {endpoint} rejected the upload: {error}") from None
    except _network_errors() as error:
        raise UploadError(f"could not reach the Hub at {endpoint}: {type(error).__name__}: {error}") from None
    return commit.commit_url


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="m2rec-push",
        description="Build, verify and upload a trained M2Rec model (a run's best/ folder) to the Hugging Face Hub.")
    parser.add_argument("--model", required=True, help="run folder: save_pretrained output, item_id_map.json, "
                                                       "training_info.json")
    parser.add_argument("--repo-id", required=True, help="target repository, namespace/name")
    parser.add_argument("--private", action="store_true", help="create the repository private; refuse to upload "
                                                               "into an existing public one")
    parser.add_argument("--revision", help="branch to push to; created from main if missing (default: main)")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload M2Rec model with m2rec-push')")
    parser.add_argument("--license", help="license id for the card, e.g. apache-2.0 or other (default: "
                                          "training_info.json's, else apache-2.0, the code's license)")
    parser.add_argument("--dry-run", action="store_true", help="build and verify, print what would be uploaded, "
                                                               "upload nothing")
    parser.add_argument("--output-dir", help="build the repository folder here and keep it (must be new or empty); "
                                             "default: a temporary folder")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        validate_repo_id(args.repo_id)
        if "/" not in args.repo_id:
            raise HFValidationError("it must be namespace/name")
    except HFValidationError as error:
        print(f"m2rec-push: error: invalid --repo-id {args.repo_id!r}: {error}", file=sys.stderr)
        return 2
    try:
        if args.output_dir:
            folder = Path(args.output_dir)
            if folder.exists() and any(folder.iterdir()):
                raise PushError(f"--output-dir {folder} is not empty; give a new or empty folder")
            folder.mkdir(parents=True, exist_ok=True)
            return _run(args, folder)
        with tempfile.TemporaryDirectory(prefix="m2rec-push-") as scratch:
            return _run(args, Path(scratch))
    except (PushError, VerificationError) as error:
        print(f"m2rec-push: error: {error}", file=sys.stderr)
        print("m2rec-push: the upload did not complete" if isinstance(error, UploadError)
              else "m2rec-push: nothing was uploaded", file=sys.stderr)
        return 1


def _run(args, folder):
    endpoint = (args.endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    token = None
    if not args.dry_run:  # fail before the slow build when the upload could not happen anyway
        token = get_token()  # HF_TOKEN, else the token saved by `hf auth login`; never printed or written
        if not token:
            raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (--dry-run needs none)")

    print(f"building the repository folder from {args.model} ...", flush=True)
    model = build_repo_folder(args.model, folder, args.repo_id, license=args.license)
    training_info = json.loads((folder / "training_info.json").read_text())
    license_id, source = resolve_license(args.license, training_info)
    if source.startswith("default") and is_movielens(training_info.get("dataset")):
        print(f"warning: no --license given; the card says {license_id} (the code's license) and explains that the "
              f"MovieLens terms still apply to the weights. Consider --license other, and --private.", file=sys.stderr)

    print("verifying: files, code, imports, fresh offline load ...", flush=True)
    summary = verify_folder(folder, model)
    print(f"verified: {len(summary['python_files'])} code files are the installed m2rec's and import only what they "
          f"may; a fresh offline AutoModel.from_pretrained(trust_remote_code=True) scores {summary['histories']} "
          f"histories like the source model (max relative difference {summary['max_difference']:.2g})")

    files = folder_files(folder)
    target = (f"{endpoint}/{args.repo_id} (revision {args.revision or constants.DEFAULT_REVISION}, "
              f"{'private' if args.private else 'public if created now'})")
    if args.dry_run:
        print(f"dry run: nothing uploaded. Would upload {len(files)} files "
              f"({human_size(sum(size for _, size in files))}) to {target}:")
        for name, size in files:
            print(f"  {name:<28} {human_size(size):>10}")
        if args.output_dir:
            print(f"the folder is kept in {folder}")
        return 0

    print(f"uploading {len(files)} files to {target} ...", flush=True)
    commit_url = upload(folder, args.repo_id, endpoint=endpoint, token=token, private=args.private,
                        revision=args.revision, commit_message=args.commit_message)
    print(f"uploaded: {commit_url}")
    print(f'load it with AutoModel.from_pretrained("{args.repo_id}", trust_remote_code=True'
          + (f', revision="{args.revision}")' if args.revision else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
