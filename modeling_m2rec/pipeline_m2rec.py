"""The `sequential-recommendation` pipeline: histories of raw catalogue ids in, raw-id recommendations with scores out.

    from transformers import pipeline
    recommender = pipeline("sequential-recommendation", model="runs/ml-1m/best", trust_remote_code=True)
    recommender(["1193", "661", "914"], k=3)
    # [{"item": "2355", "score": 7.1}, {"item": "1197", "score": 6.8}, {"item": "2858", "score": 6.5}]
    recommender([["1193", "661"], ["3408"]], k=3, exclude_seen=True)      # a list of lists: one list per history
    recommender(["1193", "661"], candidates=["1", "2", "3"])              # rank these items only

A model folder serves it when `m2rec-train` or `m2rec-push` wrote it: config.json's `custom_pipelines` names this
file, which is saved next to the model with the item vocabulary (`M2RecItemTokenizer`, which this pipeline loads as
its tokenizer). Saving a pipeline writes all three: `SequentialRecommendationPipeline(model=model,
tokenizer=tokenizer).save_pretrained(folder)`.
"""

import torch
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .tokenization_m2rec import is_batch

TASK = "sequential-recommendation"


class SequentialRecommendationPipeline(Pipeline):
    """Top-k next items for histories of raw catalogue ids.

    Call with one history (a list of raw ids, oldest first) or a list of histories, and the options:
        k (int, default 10): how many items per history (fewer when fewer are left to rank).
        candidates (list of raw ids): rank only these items.
        exclude_seen (bool, default False): leave out the items of the history, all of it (the model reads its most
            recent `max_len` items; evaluation's `exclude_history` excludes the whole history, and so does this).
        on_unknown ("error" or "skip", default "error"): what to do with raw ids of the history or the candidates
            that the model does not know (see `M2RecItemTokenizer`).
    Returns, per history, a list of {"item": raw id, "score": float}, best first; excluded items are never listed.
    `batch_size=N` (at construction or call) scores N histories per forward, right-padded together.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(self, k=None, candidates=None, exclude_seen=None, on_unknown=None, **kwargs):
        if kwargs:
            raise TypeError(f"unknown options {sorted(kwargs)}; the options are k, candidates, exclude_seen, "
                            f"on_unknown")
        preprocess_params = {name: value for name, value in (("candidates", candidates),
                                                             ("exclude_seen", exclude_seen),
                                                             ("on_unknown", on_unknown)) if value is not None}
        forward_params = {}
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"k must be a positive integer, got {k!r}")
            forward_params["k"] = k
        return preprocess_params, forward_params, {}

    def __call__(self, histories, **kwargs):
        """One history (a list of raw ids) gives one list of recommendations; a list of histories, one per history."""
        if is_batch(histories):
            return super().__call__(list(histories), **kwargs)
        return super().__call__([histories], **kwargs)[0]

    def preprocess(self, history, candidates=None, exclude_seen=False, on_unknown="error"):
        encoding = self.tokenizer(history, return_tensors="pt", on_unknown=on_unknown)  # (1, L), the last max_len
        model_inputs = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
        if exclude_seen:
            whole_history, _ = self.tokenizer.encode_history(history, on_unknown)
            model_inputs["exclude_ids"] = torch.tensor([whole_history])  # (1, H)
        if candidates is not None:
            candidate_ids, _ = self.tokenizer.encode_history(candidates, on_unknown)
            if not candidate_ids:
                raise ValueError("no candidate is an item of this model's catalogue")
            model_inputs["candidates"] = torch.tensor([list(dict.fromkeys(candidate_ids))])  # (1, C), each once
        return model_inputs

    def _forward(self, model_inputs, k=10):
        candidates = model_inputs.get("candidates")
        num_ranked = self.model.config.num_items if candidates is None else candidates.shape[1]
        items, scores = self.model.recommend(model_inputs["input_ids"], model_inputs["attention_mask"],
                                             k=min(k, num_ranked), candidates=candidates,
                                             exclude_ids=model_inputs.get("exclude_ids"))
        return {"items": items, "scores": scores}  # (B, k): the pipeline's batching hands postprocess one row

    def postprocess(self, model_outputs):
        items, scores = model_outputs["items"][0], model_outputs["scores"][0]  # (k,)
        # recommend ranks excluded items last at the dtype's lowest score; they are not recommendations.
        kept = scores > torch.finfo(scores.dtype).min
        return [{"item": raw, "score": score}
                for raw, score in zip(self.tokenizer.decode(items[kept]), scores[kept].tolist())]


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=SequentialRecommendationPipeline, pt_model=AutoModel)
