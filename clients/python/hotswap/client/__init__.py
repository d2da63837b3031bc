"""hotswap client SDK: grpcio + protobuf only.

    from hotswap.client import Client
    with Client("localhost:50051") as c:
        print(c.generate("Who are you?", adapter="support-bot", max_new_tokens=32).text)
"""
from .aio import AsyncClient
from .errors import (
    Cancelled, DeadlineExceeded, FailedPrecondition, HotswapError, Internal, InvalidArgument, NotFound,
    PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable, Unimplemented,
)
from .sync import Client
from .types import Adapter, CandidateScore, Classification, Generation, JobEvent, ModelInfo, Scores, StreamChunk, Timing, TokenLogprob, Tokens, TrainingJob

__all__ = [
    "Adapter", "AsyncClient", "CandidateScore", "Classification", "Scores", "JobEvent", "TrainingJob", "Cancelled", "Client", "DeadlineExceeded",
    "FailedPrecondition", "Generation", "HotswapError", "Internal", "InvalidArgument", "ModelInfo", "NotFound", "PermissionDenied",
    "ResourceExhausted", "StreamChunk",
    "Timing", "TokenLogprob", "Tokens", "Unauthenticated", "Unavailable", "Unimplemented",
]
