"""Publishing M2Rec models on the Hugging Face Hub: `m2rec-push` (push.py), the model card (model_card.py) and the
checks a repository folder must pass before it is uploaded (verify.py)."""

from .model_card import build_model_card
from .push import PushError, UploadError, build_repo_folder, main, upload
from .verify import VerificationError, check_files, check_imports, verify_folder

__all__ = [
    "PushError",
    "UploadError",
    "VerificationError",
    "build_model_card",
    "build_repo_folder",
    "check_files",
    "check_imports",
    "main",
    "upload",
    "verify_folder",
]
