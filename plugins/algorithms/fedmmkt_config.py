"""FedMMKT's recipe parameters (``algorithm.params``), shared by every variant that subclasses it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedmmkt_core.interfaces import ComponentConfig


class FedMMKTConfig(ComponentConfig):
    samples_per_class: int = Field(30, ge=1, le=10_000, description="synthetic pairs per class per round")
    transfer_candidates: int = Field(
        1,
        ge=1,
        le=16,
        description="hard-sample transfer: draw this many times samples_per_class images per class; the clients "
        "score them all (the generator is fine-tuned on them all), and next round they distil on the "
        "samples_per_class of each class that transfer_selection ranks hardest. 1: every image is distilled on",
    )
    transfer_selection: Literal["disagreement", "agreed-disagreement", "entropy"] = Field(
        "disagreement",
        description="with transfer_candidates > 1, which images of a class are hard: disagreement, where the "
        "clients disagree (the Jensen-Shannon divergence of their softmax outputs: entropy of their mean minus "
        "their mean entropy, as FedFTG and DENSE mine hard samples); agreed-disagreement, the same ranking "
        "among the images whose federation top class is the prompt's first (images the federation reads as "
        "their class but some clients do not: what the holders can teach the others), then the rest; entropy, "
        "where the federation's soft label is least certain (on validation it picked images no client "
        "recognises, and the clients lost accuracy)",
    )
    distill_on: Literal["previous-round", "this-round"] = Field(
        "previous-round",
        description="which synthetic set the clients distil on in a round. previous-round: the set they "
        "labelled last round (one exchange per round; the generator's update of round r first reaches their "
        "training in round r + 2). this-round: the round's own set, which they label first (a predict exchange, "
        "then fit: two exchanges per round, the same client compute; the update of round r reaches them in "
        "round r + 1). The first round is always as previous-round: untrained clients cannot label",
    )
    kd_weight: float = Field(1.0, ge=0, description="weight λ of the clients' KD term on the synthetic set")
    kd_temperature: float = Field(1.0, gt=0, description="temperature of the clients' KD term")
    logits_dtype: Literal["float32", "float16"] = Field("float16", description="dtype clients upload logits in")
    alignment_threshold: float = Field(0.5, ge=0, le=1, description="a_j at or above this counts as aligned")
    base_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="transfer_policy 'fixed': share of each class's synthetic pairs drawn from the frozen base "
        "generator (adapter off) for the clients' transfer set, the rest from the adapted generator; "
        "'judged': the first round's share. The adapter is fine-tuned on both sources' images unless "
        "fine_tune_on is base. 0 needs no generate_base",
    )
    transfer_policy: Literal["fixed", "judged"] = Field(
        "fixed",
        description="who draws each class's transfer images. fixed: base_fraction of them the frozen base, the "
        "rest the adapter. judged: the clients judge the adapter's images against the base's every round (the "
        "alignment a_j of each source's images of a class, from the same upload) and the next round's adapter "
        "share of that class is sigmoid((a_adapter - a_base) / judge_temperature), kept within "
        "[probe_fraction, 1 - probe_fraction] so both sources are judged every round (on-policy feedback). "
        "Needs generate_base",
    )
    fine_tune_on: Literal["all", "base"] = Field(
        "all",
        description="which of the round's scored pairs the adapter is fine-tuned on: all (its own images "
        "included, on-policy) or base (only the frozen base's images: the adapter never trains on its own "
        "samples, while the clients still distil on them). base needs base images (base_fraction > 0 or judged)",
    )
    probe_fraction: float = Field(
        0.2, ge=0, le=0.5, description="judged: least share of each class's images from either source"
    )
    judge_temperature: float = Field(
        0.1, gt=0, description="judged: how sharply a difference in the clients' agreement moves the share"
    )
    replay_buffer: int = Field(
        2000,
        ge=0,
        description="synthetic pairs of earlier rounds kept with the soft labels they got then: the generator is "
        "fine-tuned on them again (a growing, diverse set keeps it from collapsing onto a few aligned samples); "
        "the clients distil only on the last round's set, and the kept labels are not re-scored; "
        "0 = only the last round's set",
    )
    client_targets: Literal["ensemble", "prompt", "agreed"] = Field(
        "agreed",
        description="what clients distil on the synthetic set: 'ensemble' the federation's soft labels q_j "
        "(FedDF's target); 'prompt' mixes in the class c_j each image was generated for, on every image; "
        "'agreed' mixes it in only where the federation agrees the image shows c_j (its top class is c_j) or "
        "where no reporting client holds c_j (so the ensemble cannot know it): the server's knowledge of what "
        "it asked for, trusted where nothing contradicts it",
    )
    prompt_weight: float = Field(
        1.0, ge=0, le=1, description="β: a trusted image's target is (1-β)·q_j + β·onehot(c_j)"
    )
    inversion_steps: int = Field(
        0,
        ge=0,
        le=100,
        description="inversion feedback: with N > 0 every client also returns, for each image it labels, the "
        "change N normalised gradient steps of its own model would make to it (towards the image's class and, "
        "for networks with BatchNorm, towards its private data's feature statistics, as DeepInversion); the "
        "adapter is fine-tuned on the images moved by the clients' mean change. An image-sized upload per "
        "client that DP does not account: refused with privacy. 0: off",
    )
    inversion_step_size: float = Field(
        0.2, gt=0, le=2, description="inversion feedback: each image's total root-mean-square change, [-1, 1] scale"
    )
    class_mean_shift: float = Field(
        0.0,
        ge=0,
        le=1,
        description="class-mean feedback: with λ > 0 every client also returns the mean private image of each class "
        "it holds at least class_mean_min_count images of; the server pools them by count (μ_c) and fine-tunes the "
        "adapter on its images moved by λ·(μ_c - the round's mean image of class c). An unnoised average of "
        "private images: refused with privacy. 0: off",
    )
    class_mean_min_count: int = Field(
        20,
        ge=10,
        le=1_000_000,
        description="class-mean feedback: a client withholds a class with fewer images (and never averages fewer than "
        "10, whatever a server asks)",
    )
    feedback_warmup_rounds: int = Field(
        0,
        ge=0,
        le=1_000,
        description="for this many first rounds the adapter is fine-tuned on every one of the round's pairs it would "
        "otherwise filter, each counted aligned with its prompt (soft label = the prompt's one-hot): untrained "
        "clients recognise few images, so the clients' filter leaves the adapter almost nothing to learn from early "
        "on (with class_mean_shift the pairs are the base's images moved to the federation's class means, which "
        "need no trained client). The replay buffer keeps the pairs' real soft labels, so later rounds filter them. "
        "0: the clients' filter from the first round",
    )
    evaluate_generator: bool = Field(True, description="CAS and Fréchet distance of the generator every round")
    eval_samples_per_class: int = Field(30, ge=2, le=10_000, description="images per class for CAS / Fréchet distance")
    grid_columns: int = Field(8, ge=1, description="images per class row in the sample grid PNGs")
