"""Request bodies of the generative endpoints: pydantic checks them, a bad value is a 422 naming the field.

Numbers must be finite (NaN and 1e999 are refused, not passed on), and seeds fit a torch.Generator (0 .. 2**64 - 1).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field("", max_length=10_000, description="text to continue")
    max_tokens: int = Field(200, ge=1, le=4096)
    temperature: float = Field(0.8, gt=0, le=5)
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0: all)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="random seed (0 .. 2**64 - 1)")


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    text: str = Field(..., min_length=1, max_length=2_000, description="the sentence to translate")


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n: int = Field(16, ge=1, le=64, description="how many images")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="random seed (0 .. 2**64 - 1)")
