"""The prediction JSON the API answers with (get, create, cancel, list), at the current clock:
status, timings, tqdm-style logs, outputs as URLs or data URIs, removal after the TTL."""

from __future__ import annotations

import base64
from typing import Any

from replicate_generation.devtools.simulator.config import Shared
from replicate_generation.devtools.simulator.lifecycle import TERMINAL_STATUSES, Prediction
from replicate_generation.devtools.simulator.markers import output_tricks
from replicate_generation.devtools.simulator.output_files import CONTENT_TYPES, output_bytes
from replicate_generation.devtools.simulator.schema_models import output as shaped_output


class Renderer:
    """Renders predictions; callers hold the lock."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    def render_locked(
        self, pred: Prediction, base: str, *, as_starting: bool = False
    ) -> dict[str, Any]:
        """Render the prediction JSON of Replicate's API reference at the current clock."""
        now = self._shared.now()
        status = "starting" if as_starting else pred.status(now)
        end = pred.terminal_time()
        removed = (
            status in TERMINAL_STATUSES
            and end is not None
            and now >= end + self._shared.config.output_ttl_seconds
        )
        body: dict[str, Any] = {
            "id": pred.id,
            "model": pred.spec.ref,
            "version": pred.version,
            "input": {} if removed else dict(pred.input),
            "logs": "" if removed else _logs(pred, status, now),
            "output": None if removed else self._output_locked(pred, status, base),
            "data_removed": removed,
            "error": pred.error if status == "failed" else None,
            "source": "api",
            "status": status,
            "created_at": self._shared.iso(pred.created),
            "urls": {
                "get": f"{base}/v1/predictions/{pred.id}",
                "cancel": f"{base}/v1/predictions/{pred.id}/cancel",
                "web": f"https://replicate.com/p/{pred.id}",
            },
        }
        if pred.deployment is not None:
            body["deployment"] = pred.deployment  # as Replicate names the deployment
        deadline = pred.deadline_time()
        if deadline is not None:
            body["deadline"] = self._shared.iso(deadline)  # when its Cancel-After ends it
        if not as_starting:
            body.update(self._timing(pred, status))
        return body

    def list_item_locked(self, pred: Prediction, base: str) -> dict[str, Any]:
        """Render a prediction the way the list shows it: no logs; input gone after retention."""
        item = self.render_locked(pred, base)
        item.pop("logs", None)
        if self._shared.now() >= pred.created + self._shared.config.input_retention_seconds:
            item["input"] = {}
        return item

    def _timing(self, pred: Prediction, status: str) -> dict[str, Any]:
        """Return started_at, and completed_at plus metrics once terminal."""
        timing: dict[str, Any] = {}
        start = pred.start_time()
        if status != "starting" and start is not None:
            timing["started_at"] = self._shared.iso(start)
        end = pred.terminal_time()
        if status in TERMINAL_STATUSES and end is not None:
            timing["completed_at"] = self._shared.iso(end)
            timing["metrics"] = {
                "predict_time": round(end - start, 6) if start is not None else 0.0,
                "total_time": round(end - pred.created, 6),
            }
        return timing

    def _output_locked(self, pred: Prediction, status: str, base: str) -> Any:
        """Return the output: a list for image models, one string for video/audio."""
        if status == "processing" and pred.spec.kind == "image":
            return []  # list outputs fill in while processing (what issue #385 trips over)
        if status != "succeeded":
            return None
        if pred.empty:
            return []
        if pred.spec.kind == "text":
            return shaped_output("text", [])
        refs = [self._output_ref(pred, index, base) for index in range(pred.n_outputs)]
        if pred.spec.kind not in ("image", "video", "audio"):
            return shaped_output(pred.spec.kind, refs)  # dict and the hostile shapes
        return refs if pred.spec.kind == "image" else refs[0]

    def _output_ref(self, pred: Prediction, index: int, base: str) -> str:
        planted = output_tricks(pred.picture()["prompt"]).output_url
        if planted is not None:
            return planted  # a hostile model's output: any URL its author likes
        config = self._shared.config
        if config.output_as_data_uri:
            raw = output_bytes(pred.ext, f"{pred.id}/{index}", config.output_bytes,
                               **pred.picture())
            data = base64.b64encode(raw).decode()
            return f"data:{CONTENT_TYPES[pred.ext]};base64,{data}"
        return f"{base}/_sim/outputs/{pred.id}/{index}.{pred.ext}"


def _logs(pred: Prediction, status: str, now: float) -> str | None:
    """Return tqdm-style logs that the client's Prediction.progress can parse."""
    if status == "starting":
        return ""
    if pred.start_time() is None:
        return None  # canceled before it started: the real cancel reply has logs null
    end = pred.terminal_time()
    moment = min(now, end) if end is not None else now
    steps = 4
    done = int(pred.progress(moment) * steps + 1e-9)
    seed = int(pred.id.encode().hex()[:6], 16)
    lines = [f"Using seed: {seed}"]
    for step in range(done + 1):
        bar = ("\u2588" * (step * 10 // steps)).ljust(10)
        lines.append(
            f"{step * 100 // steps:3d}%|{bar}| {step}/{steps} [00:0{step}<00:00,  7.80it/s]"
        )
    if status == "failed" and pred.error:
        lines.append(pred.error)
    return "\n".join(lines) + "\n"
