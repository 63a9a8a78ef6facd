"""The `compression:` section of a training config, typed: `CompressionConfig`.

A section is parsed once per run, where it is read (trainer/config.py's `load_config`; launch/compress.py from
--spec), into this object; everything after takes the object, never the dict. Only the spec needs the model:
`spec_for(model_config)` builds it (a preset for this depth, or the given layers, checked against the model),
and `surgery` is the SurgerySettings `compress` takes.

    compression:                              CompressionConfig
      preset: low-rank                          .preset       (or layers:, one entry per decoder layer)
      arguments: {rope: partial}                .arguments    the preset's arguments
      layers: [...]                             .layers       [LayerSpec]
      calibration: {source, tokens, seq_len}    .calibration  CalibrationSpec
      inference: {pyramid: {...}}               .pyramid      PyramidSettings
      surgery: {rank_allocation: greedy, ...}   .surgery      SurgerySettings

The KV budget is one knob, `surgery.budget_fraction`: the compressed cache as a fraction of the original's. A
preset that takes a `budget` argument (low-rank: uniform ranks) is built at it, and `rank_allocation: greedy`
re-spends exactly it across layers. `arguments.budget` is the same knob spelt as the preset's argument (older
configs use it); both given and different is an error naming both keys. A budget that neither a preset nor the
greedy allocation meets is an error (SurgerySettings: it needs rank_allocation greedy).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from kvforge.suggest import did_you_mean

from ..configuration_kvforge import CalibrationSpec, CompressionSpec, Geometry, LayerSpec
from ..presets import PRESETS, build_preset
from ..pyramid import PyramidSettings
from .settings import SurgeryError, SurgerySettings

COMPRESSION_KEYS = ("preset", "arguments", "layers", "calibration", "inference", "surgery")


def _unknown_key(path: str, key: str, known) -> SurgeryError:
    hint = did_you_mean(key, known) or f"; known keys: {', '.join(known)}"
    return SurgeryError(f"{path}.{key}: unknown key{hint}")


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SurgeryError(f"{path} = {value!r}: expected a mapping")
    return dict(value)


def _check_preset(name: Any, path: str) -> None:
    if name not in PRESETS:
        hint = did_you_mean(name, PRESETS, n=3) or f"; known: {', '.join(sorted(PRESETS))}"
        raise SurgeryError(f"{path} = {name!r}: unknown preset{hint}")


def takes_budget(preset: Optional[str]) -> bool:
    """Whether the preset builds itself at a KV budget (a `budget` argument)."""
    return preset in PRESETS and "budget" in inspect.signature(PRESETS[preset]).parameters


def _the_budget(arguments: dict[str, Any], surgery: dict[str, Any], preset: Optional[str]) -> Optional[float]:
    """The one KV budget, from whichever of its two spellings the section uses (see the module doc)."""
    given = {"compression.surgery.budget_fraction": surgery.get("budget_fraction")}
    if takes_budget(preset):
        given["compression.arguments.budget"] = arguments.get("budget")
    given = {key: value for key, value in given.items() if value is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise SurgeryError(f"{key} = {value!r}: expected the KV budget, a fraction in (0, 1] of the original cache")
    if len(set(given.values())) > 1:
        raise SurgeryError(" and ".join(f"{key} = {value}" for key, value in given.items()) + " disagree: both are "
                           "the KV budget (a fraction of the original cache); give compression.surgery.budget_fraction "
                           "alone")
    return next(iter(given.values()), None)


@dataclass
class CompressionConfig:
    """The `compression:` section, parsed and checked key by key (errors name the key path, e.g.
    'compression.surgery.rank_alocation: unknown key; did you mean 'rank_allocation'?'); see the module doc."""

    preset: Optional[str] = None
    arguments: dict[str, Any] = field(default_factory=dict)
    layers: Optional[list[LayerSpec]] = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    pyramid: Optional[PyramidSettings] = None
    surgery: SurgerySettings = field(default_factory=SurgerySettings)
    # The section as written: what config.yaml, a checkpoint's resume signature and compressed_init's stamp hold
    # (so the derived budget spelling never makes an old run look different).
    section: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_section(cls, section: Any) -> "CompressionConfig":
        """A preset name or the `compression:` mapping -> CompressionConfig.

        Raises:
            SurgeryError / CompressionSpecError / PyramidError: an unknown key or preset (did you mean), both
                preset and layers, two budgets that disagree, or a bad value; one line naming the key path.
        """
        if isinstance(section, str):
            _check_preset(section, "'compression'")
            section = {"preset": section}
        if not isinstance(section, Mapping):
            raise SurgeryError(f"'compression' = {section!r}: expected a preset name or a mapping (preset: ..., "
                               "arguments: ..., surgery: ...)")
        written = copy.deepcopy(dict(section))
        for key in written:
            if key not in COMPRESSION_KEYS:
                raise _unknown_key("compression", key, COMPRESSION_KEYS)
        if "preset" in written and "layers" in written:
            raise SurgeryError("compression needs exactly one of `preset` (a preset name) or `layers` (one entry per "
                               "layer), not both")
        preset = written.get("preset")
        if preset is not None:
            _check_preset(preset, "compression.preset")
        arguments = _mapping(written.get("arguments"), "compression.arguments")
        if arguments and "layers" in written:
            raise SurgeryError("compression.arguments goes with compression.preset, not with compression.layers")
        surgery = _mapping(written.get("surgery"), "compression.surgery")
        budget = _the_budget(arguments, surgery, preset)
        if budget is not None and takes_budget(preset):
            arguments["budget"] = budget
            rank_allocation = surgery.get("rank_allocation", SurgerySettings.rank_allocation)
            if rank_allocation == "greedy":
                surgery["budget_fraction"] = budget
            elif rank_allocation == "as_given":  # the preset's uniform ranks meet the budget: nothing to re-spend
                surgery.pop("budget_fraction", None)
        layers = None
        if "layers" in written:
            layers = CompressionSpec.from_dict({"layers": written["layers"]}).layers
        extra = CompressionSpec.from_dict({"layers": [], "calibration": _mapping(written.get("calibration"),
                                                                                  "compression.calibration"),
                                           "inference": _mapping(written.get("inference"), "compression.inference")})
        extra.calibration.validate()
        return cls(preset=preset, arguments=arguments, layers=layers, calibration=extra.calibration,
                   pyramid=extra.pyramid, surgery=SurgerySettings.from_dict(surgery), section=written)

    @property
    def budget(self) -> Optional[float]:
        """The KV budget as a fraction of the original cache (the one knob), None when the section sets none."""
        if self.surgery.budget_fraction is not None:
            return self.surgery.budget_fraction
        return self.arguments.get("budget") if takes_budget(self.preset) else None

    def spec_for(self, model_config: Any) -> CompressionSpec:
        """The spec for this model: the preset built for its depth and heads, or the given layers; with this
        section's calibration and inference settings; checked against the model's shapes.

        Raises:
            SurgeryError / PresetError / CompressionSpecError: neither preset nor layers, a preset argument it does
                not take, a spec that does not fit the model, or a budget that nothing in the spec meets.
        """
        if self.preset is not None:
            spec = build_preset(self.preset, model_config, **self.arguments)
        elif self.layers is not None:
            spec = CompressionSpec(layers=copy.deepcopy(self.layers))
        else:
            raise SurgeryError("compression needs exactly one of `preset` (a preset name) or `layers` (one entry per "
                               "layer)")
        spec.calibration, spec.pyramid = copy.deepcopy(self.calibration), copy.deepcopy(self.pyramid)
        Geometry.of(model_config).check_spec(spec)
        if self.budget is not None and not takes_budget(self.preset) and not any(
                layer.kv_proj == "low_rank" for layer in spec.layers):
            raise SurgeryError(f"compression.surgery.budget_fraction = {self.budget}: nothing in this spec meets a "
                               f"budget: preset {self.preset!r} takes none and the spec has no low-rank layers (its KV "
                               "size is set by its layout: windows, sharing, heads)")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The section as written (a copy)."""
        return copy.deepcopy(self.section)
