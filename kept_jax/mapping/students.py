"""The students a Llama becomes with new sequence mixers: a Llamba (every attention replaced by Discrete-Mamba-2)
or a Mamba-2/attention hybrid (GraniteMoeHybrid). One place that says which config, mapping and inits each has;
`python -m kept_jax.convert --to llamba|hybrid`, the mohawk recipe and the dry run read it."""

from __future__ import annotations

from kept_jax.errors import KeptError
from kept_jax.mapping import hybrid_init, llamba_init
from kept_jax.mapping.rules import Mapping

KINDS = ("llamba", "hybrid")
ARCHITECTURES = {"llamba": "llamba", "hybrid": "granitemoehybrid"}  # kind -> the student's model_type
MIXER_INITS = {"llamba": llamba_init.MIXER_INITS, "hybrid": hybrid_init.MIXER_INITS}  # the default first


def check_mixer_init(kind: str, mixer_init: str, where: str = "mixer_init") -> None:
    if mixer_init not in MIXER_INITS[kind]:
        raise KeptError(f"{where} {mixer_init!r} is not an init of a {kind} student; choose "
                        f"{' or '.join(MIXER_INITS[kind])}")


def student_config(kind: str, teacher, mixer_init: str, layout=None, attention_layers: tuple[int, ...] = (),
                   groups: int = 1):
    """The student's config: `layout` (its config.json, read) checked against the teacher, or derived from it; a
    hybrid's attention in `attention_layers`."""
    check_mixer_init(kind, mixer_init)
    if layout is not None and layout.architecture != ARCHITECTURES[kind]:
        raise KeptError(f"the student's config.json describes a {layout.architecture!r} model, not a {kind} "
                        f"({ARCHITECTURES[kind]!r})")
    if kind == "llamba":
        return llamba_init.llamba_config_for(teacher, mixer_init, layout)
    return hybrid_init.hybrid_config_for(teacher, attention_layers, mixer_init, layout, groups)


def student_mapping(teacher, student, mixer_init: str, seed: int = 0) -> Mapping:
    """The rule table teacher -> `student` (a Llamba or a hybrid config from `student_config`)."""
    if student.architecture == "llamba":
        return llamba_init.build_llamba_mapping(teacher, student, mixer_init, seed)
    return hybrid_init.build_hybrid_mapping(teacher, student, mixer_init, seed)
