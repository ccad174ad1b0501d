"""How long the loop waits for one call to a sub-model before it takes the model for hung.

A stub that stops answering (stopped, deadlocked, stuck in a kernel) leaves its caller waiting forever: Triton's
python backend notices a dead or stopped stub (its health check fails the call within about 2 s), but not one
whose Python code never returns. So every BLS call of the loop (``server.models.RemoteStages``) waits at most

    bound = base_s + per_ktoken_s x rows x tokens / 1000 x in_flight

where ``tokens`` is the request's joint-attention length (``engine.validation.token_count``: latent frames x
(H/16) x (W/16) video tokens plus (Hr/16) x (Wr/16) per reference), ``rows`` the guidance recipe's
(``engine.guidance``: 2 under classifier-free guidance, 3 under Phantom's, 1 unguided), and ``in_flight`` the
requests the loop model is generating at the moment of the call (itself included: their calls share the sub-models'
queues). Defaults (``mvgen serve --call-timeout 60 --call-timeout-per-ktoken 1``): a Wan2.1-I2V-14B request at 480p x 81 frames with 3 references and guidance
(2 x 37440 tokens) waits at most 135 s per call alone; one step of it takes about a tenth of that on an H100.
A call that exceeds its bound fails its request with one line naming the model, and the model is restarted
(``server.supervisor``).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.guidance import request_rows
from engine.validation import token_count


@dataclass(frozen=True)
class CallBounds:
    base_s: float = 60.0
    per_ktoken_s: float = 1.0

    def __post_init__(self):
        if not self.base_s > 0:
            raise ValueError(f"the call timeout must be a positive number of seconds, got {self.base_s}")
        if not self.per_ktoken_s >= 0:
            raise ValueError(f"the call timeout per 1000 tokens must be >= 0 seconds, got {self.per_ktoken_s}")

    def bound_s(self, work_tokens: int, in_flight: int) -> float:
        """The wait allowed for one call of a request of ``work_tokens`` (``request_work``) while ``in_flight``
        requests share the loop."""
        return self.base_s + self.per_ktoken_s * work_tokens / 1000 * max(1, in_flight)


def request_work(checkpoint, request) -> int:
    """rows x tokens of a validated request (``engine.request.GenerationRequest``) on ``checkpoint``."""
    tokens = token_count(checkpoint.limits, request.num_frames, request.height, request.width,
                         len(request.references), request.reference_size)
    return len(request_rows(request)) * tokens
