"""Publishing M2Rec models on the Hugging Face Hub.

- `push.py`: the `m2rec-push` command (build the repository folder, verify it, upload it);
- `model_card.py`: the README.md model card, built from the run's training_info.json;
- `verify.py`: the checks a folder must pass before it is uploaded.

Nothing is imported here, so `python -m m2rec.hub_upload.push` runs cleanly and `import m2rec.hub_upload` stays cheap.
"""
