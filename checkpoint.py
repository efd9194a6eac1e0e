"""Everything on disk that must survive a crash: checkpoints inside a training loop, stage output
directories, and the progress of a run. Tensors go to safetensors, the rest to JSON (nothing unpickled).

    checkpoint.check_writable("out/ckpt", min_free_bytes=10**9)       # before training starts
    checkpoint.save("out/ckpt", "step-00000100", {"policy": model}, {"policy": opt}, {"step": 100})
    meta = checkpoint.resume("out/ckpt", {"policy": model}, {"policy": opt}, "rl", steps=160)
    checkpoint.write_dir("out/rl_round1", lambda tmp: model.save_pretrained(tmp))   # all or nothing
    progress = checkpoint.begin_run("out", stages, signature, resume=True)   # ["done"]: finished earlier

A checkpoint root/name holds <key>.safetensors (a model's state_dict, tied tensors stored once),
optim-<key>.safetensors (an optimizer's tensors) or, for FSDP2 models, shards/ (every rank's shards of
both, written through torch.distributed.checkpoint as safetensors files), rng-rank<r>.safetensors (rank r's RNG states: torch
CPU, its CUDA device, the generators passed in; Python's in the file's metadata) and meta.json (the
caller's meta, the optimizers' non-tensor state, the world size, whether it is sharded). It is written as root/.tmp-name,
every file fsynced, then renamed; meta.json is written last, so a directory with meta.json is
complete and a crash leaves only a .tmp-* that the next save removes.
"""
import json
import os
import random
import shutil
import time
import uuid

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

import parallel

META = "meta.json"


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)   # works for files and directories on Linux
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path, files=True):
    """fsync every file under path (files=False: only the directory itself), then the directories:
    a rename after this is durable."""
    if not files:
        return _fsync(path)
    for d, _, names in os.walk(path, topdown=False):
        for f in names:
            _fsync(os.path.join(d, f))
        _fsync(d)


def _write_tensors(tensors, path, metadata=None):
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata)
    _fsync(path)


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _split_optim(opt):
    """optimizer.state_dict() -> ({"<param index>.<name>": tensor}, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, state = {}, {}
    for i, s in sd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v
            else:
                state.setdefault(str(i), {})[k] = v
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _join_optim(tensors, rest):
    state = {}
    for name, t in tensors.items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = t
    for i, s in rest["state"].items():
        state.setdefault(int(i), {}).update(s)
    return {"state": state, "param_groups": _groups_from_json(rest["param_groups"])}


def _groups_from_json(groups):
    """An optimizer's param groups back from JSON, which turned tuples (betas) into lists; "params"
    is the only list of a param group."""
    return [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in groups]


# -----------------------------------------------------------------------------
# FSDP2 models: each rank writes its own shards (torch.distributed.checkpoint, safetensors files), and a
# checkpoint loads into any number of processes, one included (the shards are re-cut on load)

SHARDS = "shards"


def _model_tensors(model):
    """A model's (sharded) state for torch.distributed.checkpoint; a tied head is its embedding, stored once."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    tied = hasattr(model, "lm_head") and model.cfg.tie_word_embeddings
    return {k: v for k, v in get_model_state_dict(parallel.reshard(model)).items() if not (tied and k == "lm_head.weight")}


def _owner(opt, models):
    """The model whose parameters the optimizer updates."""
    mine = {id(p) for g in opt.param_groups for p in g["params"]}
    return next(m for m in models.values() if any(id(p) in mine for p in m.parameters()))


def _save_shards(path, models, optimizers):
    """Every rank writes its shards of the models and optimizers under path -> the optimizers'
    param groups (JSON-able: the rest of their state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    tensors, groups = {f"model.{k}": _model_tensors(m) for k, m in models.items()}, {}
    for k, o in optimizers.items():
        osd = get_optimizer_state_dict(_owner(o, models), o)
        tensors[f"optim.{k}"], groups[k] = osd["state"], osd["param_groups"]
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(path, save_distributed=True))
    return groups


def _load_shards(path, models, optimizers, groups):
    """What _save_shards wrote, into models and optimizers however they are sharded now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    tensors = {f"model.{k}": _model_tensors(m) for k, m in models.items()}
    tensors.update({f"optim.{k}": get_optimizer_state_dict(_owner(o, models), o)["state"] for k, o in optimizers.items()})
    try:
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(path))     # every tensor, or an error
    except CheckpointException as e:    # a BaseException: resume's fallback catches ValueError
        raise ValueError(f"{path}: {str(e).splitlines()[0] if str(e) else 'cannot read the shards'}") from None
    for k, m in models.items():
        set_model_state_dict(m, tensors[f"model.{k}"], options=StateDictOptions(strict=False))   # strict but the tie
    for k, o in optimizers.items():
        set_optimizer_state_dict(_owner(o, models), o, {"state": tensors[f"optim.{k}"],
                                                        "param_groups": _groups_from_json(groups[k])})


def _rng_tensors(generators):
    t = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():   # this rank's device only: touching the others would give them a context
        t["cuda"] = torch.cuda.get_rng_state()
    t.update({f"gen.{k}": g.get_state() for k, g in (generators or {}).items()})
    return t


def _complete(root):
    """[(order, path)] of the complete checkpoints under root; order = (meta step, save time)."""
    out = []
    for d in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, d)
        if d.startswith(".") or not os.path.isfile(os.path.join(path, META)):
            continue
        try:
            with open(os.path.join(path, META)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        step = rec.get("meta", {}).get("step")
        out.append(((step if isinstance(step, int) else -1, rec.get("saved_ns", 0)), path))
    return sorted(out)


def latest(root):
    """Path of the newest complete checkpoint under root, or None."""
    found = _complete(root)
    return found[-1][1] if found else None


def save(root, name, models, optimizers, meta, keep=2, generators=None):
    """Write root/name atomically (see the top of the file); every rank must call it (each writes its
    own RNG file and, for FSDP2 models, its shards; rank 0 the rest). Then delete all but the newest
    `keep` checkpoints (keep <= 0: keep all). models / optimizers / generators: {key: object}; meta:
    JSON-able dict, returned by load; an int meta["step"] orders the checkpoints. -> its path."""
    r = parallel.rank()
    tmp, final = os.path.join(root, ".tmp-" + name), os.path.join(root, name)
    if r == 0:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):                    # leftovers of a save that crashed
            if d.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, d))
        os.makedirs(tmp)
    parallel.barrier()
    _write_tensors(_rng_tensors(generators), os.path.join(tmp, f"rng-rank{r}.safetensors"),
                   {"python": json.dumps(random.getstate())})
    sharded = any(parallel.is_sharded(m) for m in models.values())
    optim = _save_shards(os.path.join(tmp, SHARDS), models, optimizers) if sharded else {}
    parallel.barrier()                                # every rank's files are on disk
    if r == 0:
        if not sharded:
            for k, m in models.items():
                save_model(m, os.path.join(tmp, f"{k}.safetensors"))     # shared tensors stored once
                _fsync(os.path.join(tmp, f"{k}.safetensors"))
            for k, o in optimizers.items():
                tensors, optim[k] = _split_optim(o)
                _write_tensors(tensors, os.path.join(tmp, f"optim-{k}.safetensors"))
        else:
            fsync_tree(os.path.join(tmp, SHARDS))
        _write_json({"meta": meta, "world_size": parallel.world(), "optimizers": optim, "sharded": sharded,
                     "saved_ns": time.time_ns()}, os.path.join(tmp, META))   # last: marks it complete
        _fsync(tmp)
        if os.path.exists(final):                     # the same name again: move the old one aside
            os.replace(final, os.path.join(root, ".tmp-old-" + name))
            shutil.rmtree(os.path.join(root, ".tmp-old-" + name))
        os.replace(tmp, final)
        _fsync(root)
        if keep and keep > 0:
            for _, old in _complete(root)[:-keep]:
                if old != final:
                    shutil.rmtree(old)
    parallel.barrier()
    return final


def load(path, models, optimizers, generators=None):
    """Restore models (strict: every tensor present and of the right shape), optimizers and this
    rank's RNG states from a checkpoint written by save. -> the meta dict given to save."""
    with open(os.path.join(path, META)) as f:
        rec = json.load(f)
    if rec.get("sharded"):
        _load_shards(os.path.join(path, SHARDS), models, optimizers, rec["optimizers"])
    else:
        _load_whole(path, models, optimizers, rec)
    rng_file = os.path.join(path, f"rng-rank{parallel.rank()}.safetensors")
    if rec["world_size"] != parallel.world() and not os.path.isfile(rng_file):
        return rec["meta"]         # resharded onto more processes: this rank's RNG starts from the seed
    with safe_open(rng_file, framework="pt") as f:
        version, state, gauss = json.loads(f.metadata()["python"])
        rng = {k: f.get_tensor(k) for k in f.keys()}
    random.setstate((version, tuple(state), gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    for k, g in (generators or {}).items():
        if f"gen.{k}" not in rng:
            raise ValueError(f"{path}: no state for generator {k!r}")
        g.set_state(rng[f"gen.{k}"])
    return rec["meta"]


def _load_whole(path, models, optimizers, rec):
    """Models and optimizers from the files rank 0 wrote, on as many processes as wrote them."""
    if rec["world_size"] != parallel.world():
        raise ValueError(f"{path}: written by {rec['world_size']} processes, this run has {parallel.world()}; "
                         "resume with the same number of processes")
    for k, m in models.items():
        f = os.path.join(path, f"{k}.safetensors")
        try:
            load_model(m, f, strict=True)             # also restores ties: the model holds them
        except (RuntimeError, FileNotFoundError) as e:
            raise ValueError(f"{f}: cannot restore model {k!r}: {e}") from None
    for k, o in optimizers.items():
        if k not in rec["optimizers"]:
            raise ValueError(f"{path}: no optimizer {k!r} in this checkpoint")
        o.load_state_dict(_join_optim(load_file(os.path.join(path, f"optim-{k}.safetensors")), rec["optimizers"][k]))


def resume(root, models, optimizers, stage, steps, log=print):
    """Restore the newest checkpoint under root that loads, if any, into models and optimizers (and
    this rank's RNG) -> its meta, or None when there is none. One that fails to load on any rank (a
    truncated file, say) is named in one line and the next older one is tried; SystemExit when none
    loads. A training loop saves meta with "stage", "step" and "steps"; a checkpoint of another stage,
    run length or number of processes is refused (other data or options)."""
    found = [path for _, path in reversed(_complete(root))] if root else []
    for path in found:
        with open(os.path.join(path, META)) as f:
            rec = json.load(f)
        meta = rec.get("meta", {})
        if (meta.get("stage"), meta.get("steps")) != (stage, steps):
            raise SystemExit(f"{path}: checkpoint of stage {meta.get('stage')!r} with {meta.get('steps')} steps, but "
                             f"this run is {stage!r} with {steps} steps (other data or config?): use another --out")
        if rec.get("world_size") != parallel.world() and not rec.get("sharded"):
            raise SystemExit(f"{path}: written by {rec.get('world_size')} processes, this run has {parallel.world()}; "
                             "resume with the same number of processes")
        try:
            load(path, models, optimizers)
            error = None
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
        if parallel.all_sum(int(error is not None)) == 0:      # every rank loaded it
            other = rec.get("world_size") != parallel.world()
            log(f"{stage}: resumed from {path} at step {meta['step']}/{steps}" + (
                f", resharded from {rec.get('world_size')} processes to {parallel.world()} (the random streams "
                "differ from those of an uninterrupted run)" if other else ""))
            return meta
        log(f"{stage}: cannot resume from {path} ({error or 'another process could not load it'}); "
            "trying the one before")
    if found:
        raise SystemExit(f"{stage}: none of the {len(found)} checkpoints under {root} loads; "
                         "move them aside to start the stage over")
    return None


def check_writable(dir, min_free_bytes=0):
    """Fail now, not after hours of training: `dir` must be creatable, writable and have room."""
    try:
        os.makedirs(dir, exist_ok=True)
        probe = os.path.join(dir, f".probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        free = shutil.disk_usage(dir).free
    except OSError as e:
        raise SystemExit(f"{dir}: the output directory is not writable ({e.strerror or e})") from None
    if free < min_free_bytes:
        raise SystemExit(f"{dir}: {free / 2**30:.2f} GiB free, at least {min_free_bytes / 2**30:.2f} GiB needed")


# -----------------------------------------------------------------------------
# stage output directories: replaced all at once

def write_dir(path, write):
    """Replace the directory `path` by what write(tmp) puts into a fresh temporary directory, so that
    a crash leaves the old directory or the new one, never half of one (rank 0 writes; the others
    wait). Between the two renames the old one is path.old, which restore_dir puts back."""
    if parallel.is_main():
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        fsync_tree(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_tree(os.path.dirname(os.path.abspath(path)), files=False)
        shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return path


def restore_dir(path, complete):
    """Put back path.old when write_dir crashed between its two renames (complete(dir) -> bool says
    whether a directory holds what it should). Every rank calls it; rank 0 alone renames."""
    if parallel.is_main() and not complete(path) and complete(path + ".old"):
        os.replace(path + ".old", path)
    parallel.barrier()

# -----------------------------------------------------------------------------
# the progress of a run: which stages are done, with which options, and whether it finished

PROGRESS = "progress.json"


def read_progress(out):
    """out/progress.json as a dict, or None when there is none."""
    path = os.path.join(out, PROGRESS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_progress(out, **rec):
    if parallel.is_main():
        path = os.path.join(out, PROGRESS)
        _write_json(rec, path + ".tmp")
        os.replace(path + ".tmp", path)


def unfinished(out):
    """A one-line description of the run in `out` that has not finished (it crashed, or was
    stopped), or None: progress.json not marked finished, or checkpoints left in out/ckpt (a
    stage that stopped part way, whatever ran after it)."""
    prev, ckpt = read_progress(out), os.path.join(out, "ckpt")
    if prev is not None and prev.get("finished") is False:
        return (f"stages {','.join(prev.get('stages', []))}, done: {','.join(prev['done']) or 'none'}, "
                f"stopped in: {prev.get('current') or 'none'}")
    left = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []
    return f"checkpoints of stage {', '.join(left)} in {ckpt}" if left else None


def begin_run(out, stages, signature, resume, overwrite=False, renamed=None):
    """Start a run of `stages` in `out` -> its progress dict, whose "done" lists the stages an earlier
    run finished when resuming (refused if it ran with other options: signature is the dict of
    options a resumed run must share, renamed {old: new} the options whose names changed since). A
    fresh run into a directory whose run is unfinished is refused, as it would lose that run's
    checkpoints, unless overwrite: then they are deleted."""
    done, prev, left = [], read_progress(out), unfinished(out)
    parallel.barrier()                      # every rank has read out before rank 0 writes to it
    if resume:
        if prev is not None:
            prev["config"] = {(renamed or {}).get(k, k): v for k, v in prev["config"].items()}
            # an option the earlier run did not have yet ran at what is now its default: not compared
            diff = sorted(k for k, v in signature.items()
                          if k in prev["config"] and json.dumps(prev["config"][k]) != json.dumps(v))
            if diff:
                raise SystemExit(f"--resume: {out} was run with other options: " +
                                 ", ".join(f"--{k}={prev['config'].get(k)} (now {signature[k]})" for k in diff))
            done = prev["done"]
    else:
        if left and not overwrite:
            raise SystemExit(f"{out} holds an unfinished run ({left}): --resume=true goes on with it, "
                             "--overwrite=true starts over and deletes its checkpoints")
        if overwrite and parallel.is_main():
            shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
    progress = dict(done=done, stages=stages, current=None, finished=False, config=signature)
    _write_progress(out, **progress)
    parallel.barrier()
    return progress


def stage_start(out, progress, name):
    """Record that stage `name` runs now (progress: the dict begin_run wrote)."""
    progress.update(current=name)
    _write_progress(out, **progress)


def stage_done(out, progress, name):
    """Record stage `name` as finished; its in-stage checkpoints go, as its output directory now
    holds what they did."""
    progress.update(done=progress["done"] + [name], current=None)
    _write_progress(out, **progress)
    if parallel.is_main():
        shutil.rmtree(os.path.join(out, "ckpt", name), ignore_errors=True)
    parallel.barrier()


def end_run(out, progress):
    """Every stage finished: recorded, and an empty out/ckpt is removed (nothing left to resume)."""
    progress.update(finished=True)
    _write_progress(out, **progress)
    ckpt = os.path.join(out, "ckpt")
    if parallel.is_main() and os.path.isdir(ckpt) and not os.listdir(ckpt):
        os.rmdir(ckpt)

# -----------------------------------------------------------------------------
# the provenance of stage outputs: what each was made from, so that a chain with a remade link is
# seen to be stale

PROVENANCE = "provenance.json"


def provenance(path):
    """The provenance.json of a stage output directory; {} for a directory without one (a user's
    model, an output written before provenance was recorded) or no directory."""
    try:
        with open(os.path.join(path, PROVENANCE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def output_id(path):
    """The id of a stage output directory (provenance); None when it has none."""
    return provenance(path).get("id")


def write_provenance(path, stage, made_from, prompt=None):
    """path/provenance.json: a new id for this output, the stage that made it, the ids of the
    outputs it was made from ({name: id}) and the prompt style its models learned (--prompt)."""
    _write_json({"id": uuid.uuid4().hex, "stage": stage, "made_from": made_from, "prompt": prompt},
                os.path.join(path, PROVENANCE))


def stale(dirs):
    """{name: [its stale inputs]} of the outputs in dirs ({name: path}, each input before the outputs
    made from it) that were made from an input whose id has changed since, or from a stale one. An
    output without provenance, or an input without an id then or now, is not judged."""
    ids, out = {n: output_id(p) for n, p in dirs.items()}, {}
    for name, path in dirs.items():
        try:
            with open(os.path.join(path, PROVENANCE)) as f:
                made_from = json.load(f).get("made_from", {})
        except (OSError, ValueError):
            continue
        why = [i for i, was in made_from.items() if i in out or (None not in (was, ids.get(i)) and ids[i] != was)]
        if why:
            out[name] = why
    return out
