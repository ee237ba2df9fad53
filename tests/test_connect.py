"""Joining and leaving Ray (sweep/cluster.py): a Ray the caller started is left running."""

from __future__ import annotations

import ray

from covid_tune.sweep import cluster


def test_a_ray_the_caller_started_stays_up_one_we_started_stops(monkeypatch) -> None:
    calls: list[str] = []
    up = {"v": True}
    monkeypatch.setattr(ray, "is_initialized", lambda: up["v"])
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(f"init {kw.get('address')}"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(cluster, "_connected_here", False)

    cluster.connect(None)  # the caller's Ray (a notebook, a script): joined as it is
    cluster.disconnect()
    assert calls == []

    up["v"] = False
    cluster.connect(None)  # none running: started here, so stopped here
    cluster.disconnect()
    cluster.disconnect()  # once
    assert calls == ["init local", "shutdown"]
