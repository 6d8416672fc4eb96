"""Every finding code, once: its severity and what it means.

Codes are stable (tests, `--json` users and CI scripts rely on them). Severities:
error = a merge would be wrong or incomplete; warning = it works but something is off;
info = worth knowing (what DeepSpeed's converter would have done differently, for instance).
A finding is made with `finding(code, ...)`, so a code cannot be raised at two severities.
"""

from __future__ import annotations

from zinspect.core.model import ERROR, INFO, WARNING, Finding

#: code -> (severity, one-line meaning)
CODES: dict[str, tuple[str, str]] = {
    # files
    "empty-tag-dir": (ERROR, "the tag dir holds no files"),
    "unreadable-file": (ERROR, "a rank file cannot be parsed (damaged, truncated, not a torch file)"),
    "truncated-file": (ERROR, "tensor records of a file are cut short"),
    "no-zip-directory": (WARNING, "a zip's central directory is lost; records found by their headers"),
    "legacy-format": (INFO, "a file in torch's legacy (non-zip) format"),
    "unsafe-pickle": (ERROR, "a pickle names code that torch.load would run"),
    "unknown-classes": (INFO, "a pickle names classes zinspect does not know (never imported)"),
    "extra-file": (INFO, "a file that is not part of a checkpoint"),
    "symlinked-file": (INFO, "a rank file is a symbolic link (followed)"),
    "no-latest": (INFO, "the root has no `latest`; its only tag dir was used"),
    "not-optimizer-file": (ERROR, "an optimizer file name holds no optimizer_state_dict"),
    "not-model-states": (ERROR, "a model-states file name holds no model states"),
    "no-model-states": (ERROR, "no model-states file: names and shapes are unknown"),
    "no-optimizer-files": (ERROR, "no optimizer files nor an optimizer in the model states: "
                                  "the fp32 masters are missing"),
    "legacy-file-name": (WARNING, "a pre-0.10 optimizer file name (DeepSpeed's converter skips it)"),
    # layout and topology
    "unsupported-layout": (ERROR, "a layout zinspect recognises but cannot merge yet"),
    "unknown-layout": (ERROR, "optimizer files of no known ZeRO layout"),
    "bf16-optimizer": (INFO, "the BF16_Optimizer layout (zero_to_fp32.py refuses it)"),
    "round-robin": (INFO, "round_robin_gradients reorders the flat groups (handled)"),
    "topology-mismatch": (ERROR, "the file names and the pickles disagree on the parallel sizes"),
    "universal-state-missing": (ERROR, "a universal checkpoint lacks a param's fp32.pt (or it does not fit)"),
    # tensor parallel (layouts/tensor_parallel.py, tp_rules.py)
    "missing-tp-rank": (ERROR, "a tensor-parallel rank's model states are missing"),
    "tp-param-missing": (ERROR, "a param some tp ranks hold and others do not"),
    "tp-split-unknown": (ERROR, "how a param's tp shards join cannot be known (never guessed)"),
    "tp-shard-shape": (ERROR, "a tp rank's shard has a shape its split rule does not allow"),
    "tp-coverage": (ERROR, "the tp shards do not place every element of the full tensor once"),
    "tp-split-mismatch": (WARNING, "the affine map and the split patterns disagree (map used)"),
    "tp-info-mismatch": (WARNING, "the tp ranks' universal_checkpoint_info differ"),
    "tp-replica-drift": (WARNING, "a replicated param differs between tp ranks (merge: lowest written)"),
    # pipeline, MoE and ZeRO-0 (layouts/pipeline.py, moe.py, zero0.py)
    "missing-stage-file": (ERROR, "a pipeline stage's mp_rank_SS model-states file is missing"),
    "missing-layer-file": (ERROR, "a pipeline layer file is missing where the optimizer holds params"),
    "missing-expert-file": (ERROR, "an MoE expert file (or a param in it) is missing"),
    "zero0-order-unknown": (ERROR, "ZeRO-0 masters cannot be matched to param names by shape"),
    "zero0-frozen-unknown": (INFO, "a ZeRO-0 fp32 run's frozen params cannot be told"),
    "pipeline-tied-unnamed": (WARNING, "a ZeRO-0 pipeline's tied layer, named by its index"),
    "pipeline-stages-unknown": (INFO, "a ZeRO-0 pipeline's frozen params cannot be told"),
    "tied-copy-drift": (WARNING, "a tied param differs between pipeline stages (merge: lowest written)"),
    # ranks and runs
    "world-size-unknown": (ERROR, "no readable optimizer file says the world size"),
    "missing-optimizer-file": (ERROR, "a rank's optimizer file is missing"),
    "missing-model-states-file": (ERROR, "a rank's ZeRO-3 model-states file is missing"),
    "stale-rank-file": (ERROR, "a rank file beyond the world size (another run's)"),
    "duplicate-rank": (ERROR, "two optimizer files for one rank"),
    "mixed-prefix": (ERROR, "optimizer files with different bf16_/fp16_ prefixes"),
    "stage-mismatch": (ERROR, "files of different ZeRO stages"),
    "world-size-mismatch": (ERROR, "files saved at different world sizes"),
    "step-mismatch": (ERROR, "a rank's optimizer was saved at another step"),
    "ds-version-mismatch": (WARNING, "files saved by different DeepSpeed versions"),
    "rank0-model-missing": (WARNING, "the rank-0 model states are missing; tied links may be lost"),
    # groups and params
    "group-missing": (ERROR, "a rank file lacks a flat group's partition"),
    "partition-size": (ERROR, "a rank's partition has the wrong number of elements"),
    "group-coverage": (ERROR, "the ranks hold more or fewer elements than the group's params"),
    "slice-mapping-mismatch": (WARNING, "the optimizer's param_slice_mappings disagree with the shapes"),
    "param-order-mismatch": (ERROR, "the optimizer's param_slice_mappings place a param elsewhere "
                             "than the model states' param_shapes order"),
    "param-shape": (ERROR, "param_shapes gives a param no valid shape"),
    "duplicate-param": (ERROR, "a param is in two param groups"),
    "shape-mismatch": (ERROR, "param_shapes and the module's weight disagree on a shape"),
    "param-unaccounted": (ERROR, "a module param in no group, frozen list or tie"),
    "no-params": (ERROR, "the model states name no parameters"),
    "tied-source-missing": (ERROR, "a tied alias whose owner is not in the checkpoint"),
    "frozen-missing": (ERROR, "a frozen param with no saved values"),
    "frozen-from-module": (INFO, "a ZeRO-1 frozen param recovered from the 16-bit module"),
    "param-coverage": (ERROR, "elements of a param held by no rank file"),
    "param-overlap": (ERROR, "elements of a param held twice"),
    "param-truncated": (ERROR, "a param's bytes are not all in its file"),
    "master-not-fp32": (WARNING, "the optimizer masters are 16-bit"),
    "int-buffers": (INFO, "integer buffers keep their dtype"),
    # reading every byte (validate --deep, merge, stats)
    "crc-mismatch": (ERROR, "a record's bytes do not match its zip CRC"),
    "crc-unavailable": (INFO, "a file has no CRCs to check (legacy format)"),
    "record-unreadable": (ERROR, "a record cannot be read whole"),
    "values-unchecked": (INFO, "NaN/Inf were not counted"),
    "nan-values": (WARNING, "NaN values in a tensor"),
    "inf-values": (WARNING, "Inf values in a tensor"),
}


def finding(code: str, message: str, hint: str = "", **where) -> Finding:
    """A finding of a registered `code`, at the code's severity."""
    return Finding(CODES[code][0], code, message, hint, **where)
