"""Scale-out on Ray: samples sharded over actors that each load the model once and write shards of one store.

``vlm-lens analyze --workers N [--ray-address ADDR]`` (``pip install 'vlm-lens[distributed]'``). The driver streams
the source in chunks of ``batch_size`` samples to whichever actor is free (at most two chunks queued per actor, so
the driver holds only the chunks in flight), and each actor runs :func:`streaming.phase1` on its chunk, writing
shards named after itself. When an actor dies (killed, out of memory, a lost node) its chunk goes to a fresh actor;
samples the dead one had already committed are skipped (the store's commit marker), and a duplicate commit from a
racing retry is dropped on read. Then the skip sets (from the stages of the whole store) go out the same way.

Ray is imported only here, only when ``workers > 0``. Usage statistics are switched off before Ray starts
(``RAY_USAGE_STATS_ENABLED=0``): nothing phones home. Each actor asks for one GPU when the cluster has GPUs.
"""

from __future__ import annotations

import os
from typing import Any

from vlm_lens.errors import InputError
from vlm_lens.experiments.runs import streaming
from vlm_lens.experiments.runs.store import Store


def _worker_class(ray):
    @ray.remote(max_restarts=0, max_task_retries=0)
    class Worker:
        def __init__(self, model_ref: dict, lens_state: dict | None, store_path: str, settings: dict, threads: int,
                     name: str):  # fmt: skip
            import torch

            import vlm_lens
            from vlm_lens.probes import TunedLens

            torch.set_num_threads(max(1, threads))
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = getattr(torch, model_ref["dtype"]) if device == "cuda" else torch.float32
            self.model = vlm_lens.load(model_ref["name"], device=device, dtype=dtype)
            self.lens = None
            if lens_state is not None:
                self.lens = TunedLens(**lens_state["args"])
                self.lens.load_state_dict(lens_state["state"])
                self.lens.check_model(self.model)
            self.store = Store(store_path)
            self.settings = settings
            self.name = name

        def pid(self) -> int:
            return os.getpid()

        def phase1(self, entries: list, batch_size: int) -> int:
            ids = {e.id for e in entries}
            return streaming.phase1(self.model, entries, self.store, self.settings["stream"], tuned_lens=self.lens,
                                    batch_size=batch_size, writer=self.name, only=ids,
                                    references=self.settings["references"])  # fmt: skip

        def phase2(self, entries: list, sets: dict, batch_size: int) -> int:
            return streaming.phase2(self.model, entries, self.store, sets, batch_size=batch_size, writer=self.name,
                                    only={e.id for e in entries})  # fmt: skip

    return Worker


def model_reference(model) -> dict:
    """How an actor loads the same model: its embedded name or checkpoint folder (an in-memory model cannot be
    re-loaded in another process: save it with ``save_pretrained`` and pass the folder)."""
    from pathlib import Path

    from vlm_lens import zoo

    name = model.name
    if name not in zoo.EMBEDDED and not Path(name).is_dir():
        raise InputError(f"--workers needs a model every worker can load by name or folder; {name!r} is neither: "
                         "save it with save_pretrained(DIR) (and its processor) and pass --model DIR")  # fmt: skip
    dtype = str(next(model.hf_model.parameters()).dtype).replace("torch.", "")
    return {"name": name, "dtype": dtype}


def _lens_state(lens) -> dict | None:
    if lens is None:
        return None
    args = {"n_layers": lens.config["n_layers"], "d_model": lens.config["d_model"], "d_vocab": lens.config["d_vocab"],
            "model_name": lens.config.get("model_name", "")}  # fmt: skip
    return {"args": args, "state": {k: v.detach().cpu() for k, v in lens.state_dict().items()}}


def _ray_running() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def start(address: str | None, workers: int):
    """Connect to ``address`` or start a local cluster sized for ``workers`` (no dashboard, no usage stats)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster for this run only: no token prompt
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def run(model, source, store: Store, settings: "streaming.StreamSettings", *, tuned_lens=None, batch_size: int = 4,
        workers: int = 2, address: str | None = None, progress=None, threads: int | None = None,
        on_started=None) -> dict:  # fmt: skip
    """Phase 1 then phase 2 over ``workers`` Ray actors; returns ``{"phase1": n, "phase2": n, "restarts": k}``.

    ``on_started(pids)`` is called with the actors' process ids once they are up (tests kill one)."""
    from vlm_lens.experiments.runs import store_analysis

    started_here = not _ray_running()
    ray = start(address, workers)
    gpus = ray.cluster_resources().get("GPU", 0)
    worker_cls = _worker_class(ray).options(num_gpus=1 if gpus >= 1 else 0, num_cpus=1)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    init = (model_reference(model), _lens_state(tuned_lens), str(store.path), {"stream": settings, "references": streaming.run_references(source, settings)},
            threads)  # fmt: skip
    spawned = [0]

    def spawn():
        spawned[0] += 1
        return worker_cls.remote(*init, f"w{spawned[0]}")

    actors = [spawn() for _ in range(workers)]
    if on_started is not None:
        on_started(ray.get([a.pid.remote() for a in actors]))
    report = progress or (lambda *a: None)
    done = store.done_ids(1)
    pending = (e for e in source if e.id not in done)
    n1, restarts = _drive(ray, actors, spawn, pending, lambda a, chunk: a.phase1.remote(chunk, batch_size),
                          batch_size, lambda n: report("tracing", len(done) + n, len(source)))  # fmt: skip
    sets = store_analysis.skip_sets(store, store_analysis.aggregate(store))
    n2 = 0
    if sets is not None:
        wanted = streaming.skip_pending(store)
        todo = (e for e in source if e.id in wanted)  # lazy: entries may hold decoded images
        n2, more = _drive(ray, actors, spawn, todo, lambda a, chunk: a.phase2.remote(chunk, sets, batch_size),
                          batch_size, lambda n: report("layer skipping", n, len(wanted)))  # fmt: skip
        restarts += more
    for actor in actors:
        ray.kill(actor)
    if started_here:
        ray.shutdown()
    return {"phase1": n1, "phase2": n2, "restarts": restarts}


def _drive(ray, actors: list, spawn, entries, submit, batch_size: int, tick) -> tuple[int, int]:
    """Keep every actor busy with chunks of ``entries``; re-send a dead actor's chunk to a fresh one."""
    from ray.exceptions import RayActorError

    in_flight: dict[Any, tuple[int, list]] = {}  # future -> (actor slot, chunk)
    done, restarts, exhausted = 0, 0, False

    def next_chunk() -> list | None:
        chunk = []
        for entry in entries:
            chunk.append(entry)
            if len(chunk) >= batch_size:
                break
        return chunk or None

    def feed(slot: int, chunk: list | None = None) -> bool:
        chunk = chunk if chunk is not None else next_chunk()
        if chunk is None:
            return False
        in_flight[submit(actors[slot], chunk)] = (slot, chunk)
        return True

    for slot in range(len(actors)):
        for _ in range(2):  # two chunks queued per actor: no idle gap between tasks
            exhausted = exhausted or not feed(slot)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        slot, chunk = in_flight.pop(ready[0])
        try:
            ray.get(ready[0])
            done += len(chunk)
            tick(done)
        except RayActorError:  # the actor died: a fresh one takes its place and this chunk
            restarts += 1
            actors[slot] = spawn()
            lost = [f for f, (s, _) in in_flight.items() if s == slot]
            for future in lost:  # the dead actor's queued chunks go to the new one too
                feed(slot, in_flight.pop(future)[1])
            feed(slot, chunk)
            continue
        if not exhausted:
            exhausted = not feed(slot)
    return done, restarts
