"""A two-node mesh on loopback through the bindings: pipeline generation
across the nodes gives the local text; bad addresses are typed errors."""

import os
import threading

import pytest

import mesh_llm

MODEL = os.environ.get("MESH_MODEL", "default")


@pytest.fixture(scope="module")
def model():
    with mesh_llm.Model(MODEL, n_threads=1) as m:
        yield m


def test_two_nodes_pipeline_equals_local(model):
    events = []
    lock = threading.Lock()

    def on_event(e):
        with lock:
            events.append(e)

    split = model.n_layers // 2
    with mesh_llm.Node(listen=["/ip4/127.0.0.1/tcp/0"]) as a:
        a_id = a.peer_id
        assert a_id.startswith("12D3KooW")
        addrs = a.listen_addrs
        assert addrs and all(x.endswith("/p2p/" + a_id) for x in addrs)
        a.serve(model, (0, split))
        with mesh_llm.Node(bootstrap=[addrs[0]], on_event=on_event) as b:
            b.serve(model, (split, model.n_layers))
            kw = dict(temperature=0, max_tokens=16, ignore_eos=True)
            piped = b.generate(model, "The capital of France is", mesh_llm.Mode.PIPELINE, **kw)
            local = b.generate(model, "The capital of France is", mesh_llm.Mode.LOCAL, **kw)
            assert piped.text == local.text and piped.text
            assert piped.stats.n_hops == 2
            assert piped.stats.failovers == 0
            assert piped.stats.hop_ms > 0
            assert local.stats.n_hops == 0
    with lock:
        plans = [e for e in events if e.get("event") == "plan"]
    assert plans, events
    hops = plans[-1]["hops"]
    assert [h["layers"] for h in hops] == [[0, split], [split, model.n_layers]]
    assert hops[0]["peer_id"] == a_id
    assert hops[1]["peer_id"] == "local"


def test_private_mode_across_three_nodes_equals_local_exact():
    """A and B hold the shares, C owns the prompt (all on 127.0.0.1, so C
    trusts A and B by id): the text equals C's local exact generation."""
    with mesh_llm.Model(MODEL, n_threads=1) as plain, mesh_llm.Model(
        MODEL, n_threads=1, exact=True
    ) as exact:
        with mesh_llm.Node(listen=["/ip4/127.0.0.1/tcp/0"]) as a:
            a.serve_helper(plain)
            boot = a.listen_addrs[0]
            with mesh_llm.Node(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[boot]) as b:
                b.serve_helper(plain)
                with mesh_llm.Node(
                    bootstrap=[boot], trusted=[a.peer_id, b.peer_id], private_helpers=2
                ) as c:
                    kw = dict(temperature=0, max_tokens=12, ignore_eos=True)
                    prompt = "The capital of France is"
                    private = c.generate(exact, prompt, mesh_llm.Mode.PRIVATE, **kw)
                    local = c.generate(exact, prompt, mesh_llm.Mode.LOCAL, **kw)
                    assert private.text == local.text and private.text
                    assert private.stats.n_helpers == 2
                    assert private.stats.helpers_dropped == 0
                    assert private.stats.bytes_per_token > 1e6


def test_bad_addresses_and_modes_are_typed_errors(model):
    with pytest.raises(mesh_llm.MeshError) as e:
        mesh_llm.Node(listen=["not a multiaddr"])
    assert e.value.status == mesh_llm.Status.INVALID_ARG
    with pytest.raises(mesh_llm.MeshError) as e:
        mesh_llm.Node(trusted=["not a peer id"])
    assert e.value.status == mesh_llm.Status.INVALID_ARG
    with mesh_llm.Node(find_timeout=0.3) as n:
        with pytest.raises(mesh_llm.MeshError) as e:
            n.dial("nonsense")
        assert e.value.status == mesh_llm.Status.INVALID_ARG
        # Private mode with no helper on the mesh.
        with pytest.raises(mesh_llm.MeshError) as e:
            n.generate(model, "Hi", mesh_llm.Mode.PRIVATE, max_tokens=2)
        assert e.value.status == mesh_llm.Status.NETWORK
        assert "helpers" in str(e.value)


def test_a_lone_validator_runs_the_ledger(model, tmp_path):
    import json
    import time

    with mesh_llm.Node(listen=["/ip4/127.0.0.1/tcp/0"], identity_path=str(tmp_path / "id.key")) as n:
        with pytest.raises(mesh_llm.MeshError):
            n.ledger_status()  # no ledger runs yet
        genesis = tmp_path / "genesis.json"
        genesis.write_text(
            json.dumps({"chain_id": "py", "validators": [{"peer_id": n.peer_id, "power": 2}]})
        )
        n.ledger_start(str(genesis), str(tmp_path / "l.redb"), str(tmp_path / "u"))
        deadline = time.time() + 60
        while n.ledger_status()["height"] < 2:
            assert time.time() < deadline, n.ledger_status()
            time.sleep(0.1)
        s = n.ledger_status()
        assert s["validator"] is True and len(s["tip"]) == 64 and s["active"] == {}
        assert s["stakes"] == {n.peer_id: 2}
        assert n.ledger_adapter(model) is None
        # Stake transfers: more than it holds, a bad peer id, and itself are refused.
        with mesh_llm.Node(listen=["/ip4/127.0.0.1/tcp/0"]) as other:
            for to, amount in [(other.peer_id, 3), ("not-a-peer", 1), (n.peer_id, 1)]:
                with pytest.raises(mesh_llm.MeshError) as e:
                    n.ledger_transfer(to, amount)
                assert e.value.status == mesh_llm.Status.INVALID_ARG
            n.ledger_transfer(other.peer_id, 1)
            while n.ledger_status()["stakes"] != {n.peer_id: 1, other.peer_id: 1}:
                assert time.time() < deadline + 60, n.ledger_status()
                time.sleep(0.1)
