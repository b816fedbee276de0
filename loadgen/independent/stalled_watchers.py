#!/usr/bin/env python3
"""What never-read watch streams cost the write path, measured by a client that
shares no code with cellplane or its Rust loadgen: Python's grpcio (gRPC C-core)
on asyncio, with stubs generated at run time from proto/etcd/.

One run: open --watchers Watch streams on --watch-conns channels of their own,
each sending one WatchCreateRequest for the whole --prefix range and then never
reading (the call object is kept; read() is never called), then run --writers
closed-loop writers on --write-conns channels putting --value-bytes values under
--prefix for --warmup + --duration seconds. Prints one JSON line on stdout:
puts/s, latency percentiles over the measured window, errors, and (with
--server-pids) the servers' CPU per 1,000 puts. --watchers 0 is the baseline.

    stalled_watchers.py 127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399 \\
        --duration 10 --watchers 1000 --server-pids 101,102,103 --label cellplane

Channels keep gRPC C-core's default options (HTTP/2 windows grown by BDP
probing, as grpc-go's), but each uses a local subchannel pool: C-core would
otherwise share one TCP connection between channels to the same address, and
the 16 + 16 connections of the issue would be one per endpoint.

Exit status: 0 ok; 1 setup failed (stubs, connections, watchers, no put
succeeded); 3 the run completed but some puts failed (the JSON line is printed,
with "ok": false).
"""

import argparse
import asyncio
import collections
import importlib
import json
import os
import random
import resource
import sys
import tempfile
import time

ME = os.path.basename(sys.argv[0])
REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
TICKS = os.sysconf("SC_CLK_TCK")


class Failure(Exception):
    pass


def fail(msg):
    raise Failure(msg)


def gen_stubs(proto_root, out):
    """Generates the etcdserverpb and mvccpb modules into `out`, imports them."""
    try:
        import grpc  # noqa: F401
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        fail(f"needs grpcio and grpcio-tools ({e}): python3 -m pip install grpcio grpcio-tools")
    # rpc.proto (services KV and Watch) imports mvccpb/kv.proto; nothing else.
    files = ["etcdserverpb/rpc.proto", "mvccpb/kv.proto"]
    for f in files:
        if not os.path.isfile(os.path.join(proto_root, f)):
            fail(f"no {f} under {proto_root}")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
                      f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        fail(f"grpc_tools.protoc failed ({rc}) on {files} under {proto_root}")
    sys.path.insert(0, out)
    pb = importlib.import_module("etcdserverpb.rpc_pb2")
    pb_grpc = importlib.import_module("etcdserverpb.rpc_pb2_grpc")
    return pb, pb_grpc


def prefix_end(p: bytes) -> bytes:
    b = bytearray(p)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"  # every key


def cpu_ms(pid):
    """utime + stime of every thread of `pid`, in ms; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICKS


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_sum(pids):
    vals = [cpu_ms(p) for p in pids]
    return None if any(v is None for v in vals) else sum(vals)


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def channel(target):
    import grpc
    # Default options but for the subchannel pool (see the module's doc).
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


async def open_channels(endpoints, n, what):
    chans = [channel(endpoints[i % len(endpoints)]) for i in range(n)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in chans)), 15)
    except asyncio.TimeoutError:
        await asyncio.gather(*(c.close() for c in chans), return_exceptions=True)
        fail(f"{what}: could not connect to {','.join(endpoints)} within 15 s")
    return chans


async def run(a, pb, pb_grpc):
    import grpc

    endpoints = [e.strip() for e in a.endpoints.split(",") if e.strip()]
    if not endpoints:
        fail("no endpoints")
    server_pids = [int(p) for p in a.server_pids.split(",") if p] if a.server_pids else []
    prefix = a.prefix.encode()
    value = os.urandom(a.value_bytes)
    rng = random.Random(a.seed)
    keys = [prefix + b"%012d" % i for i in range(a.keys)]

    write_chans, watch_chans, calls = [], [], []
    ended_at = []  # when each watch call finished (perf_counter)
    try:
        # Watchers first, as the issue has it: 1,000 streams, then the load.
        if a.watchers > 0:
            watch_chans = await open_channels(endpoints, a.watch_conns, "watchers")
            create = pb.WatchRequest(create_request=pb.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix)))
            stubs = [pb_grpc.WatchStub(c) for c in watch_chans]

            def on_done(call):
                ended_at.append(time.perf_counter())

            async def open_one(i):
                call = stubs[i % len(stubs)].Watch()
                calls.append(call)
                call.add_done_callback(on_done)
                await call.write(create)

            t = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(a.watchers))), 30)
                # The servers send a stream's response headers with its first
                # response (the created ack): wait for them, reading no message.
                await asyncio.wait_for(asyncio.gather(*(c.initial_metadata() for c in calls)), 30)
            except asyncio.TimeoutError:
                fail(f"{a.watchers} watch streams not all answered within 30 s "
                     f"({sum(c.done() for c in calls)} ended)")
            except grpc.aio.AioRpcError as e:
                fail(f"opening a watch stream: {e.code().name}: {e.details()}")
            bad = [c for c in calls if c.done()]
            if bad:
                fail(f"{len(bad)} of {a.watchers} watch streams ended while opening: "
                     f"{(await bad[0].code()).name}: {await bad[0].details()}")
            watch_open_s = time.monotonic() - t
        else:
            watch_open_s = 0.0

        write_chans = await open_channels(endpoints, a.write_conns, "writers")
        kv = [pb_grpc.KVStub(c) for c in write_chans]

        lat = []
        errors = collections.Counter()
        first_error = {}
        start = time.perf_counter()
        t0 = start + a.warmup
        t1 = t0 + a.duration

        async def writer(w):
            stub = kv[w % len(kv)]
            put = stub.Put
            while True:
                s = time.perf_counter()
                if s >= t1:
                    return
                req = pb.PutRequest(key=keys[rng.randrange(len(keys))], value=value)
                try:
                    await put(req, timeout=a.timeout)
                except grpc.aio.AioRpcError as e:
                    e_t = time.perf_counter()
                    if t0 <= e_t <= t1:
                        errors[e.code().name] += 1
                        first_error.setdefault(e.code().name, e.details())
                    await asyncio.sleep(0.01)  # no hot loop on a refusing server
                    continue
                e_t = time.perf_counter()
                if t0 <= e_t <= t1:
                    lat.append(e_t - s)

        tasks = [asyncio.create_task(writer(w)) for w in range(a.writers)]
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        m0 = time.perf_counter()
        srv0, me0 = cpu_sum(server_pids), cpu_ms(os.getpid())
        await asyncio.sleep(max(0.0, t1 - time.perf_counter()))
        m1 = time.perf_counter()
        srv1, me1 = cpu_sum(server_pids), cpu_ms(os.getpid())
        srv_rss = [rss_mb(p) for p in server_pids]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), a.timeout + 5)
        except asyncio.TimeoutError:
            for t in tasks:
                t.cancel()
            fail("writers did not stop within the request timeout")

        watch_ended = sum(c.done() for c in calls)
        watch_codes = collections.Counter()
        watch_detail = None
        for c in calls:
            if c.done() and not c.cancelled():
                code = await c.code()
                watch_codes[code.name] += 1
                watch_detail = watch_detail or await c.details()

        lat.sort()
        n = len(lat)
        window = t1 - t0
        ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
        out = {
            "label": a.label,
            "endpoints": endpoints,
            "writers": a.writers,
            "write_conns": a.write_conns,
            "watchers": a.watchers,
            "watch_conns": a.watch_conns if a.watchers else 0,
            "value_bytes": a.value_bytes,
            "keys": a.keys,
            "prefix": a.prefix,
            "warmup_s": a.warmup,
            "duration_s": a.duration,
            "puts": n,
            "ops_per_s": round(n / window, 1),
            "p50_ms": ms(pct(lat, 0.50)),
            "p99_ms": ms(pct(lat, 0.99)),
            "p999_ms": ms(pct(lat, 0.999)),
            "max_ms": ms(lat[-1] if lat else None),
            "errors": sum(errors.values()),
            "errors_by_code": dict(errors),
            "first_error": first_error,
            "watch_open_s": round(watch_open_s, 3),
            # Streams the client saw end during the run, never having read them
            # (C-core may surface a status only once earlier messages are read, so
            # a server that ends a stream behind unread data may not show here).
            "watch_streams_ended": watch_ended,
            "watch_end_codes": dict(watch_codes),
            "watch_end_detail": watch_detail,
            "first_watch_end_s": round(min(ended_at) - start, 3) if ended_at else None,
            "client_cpu_ms_per_1k_puts": round((me1 - me0) / n * 1000, 1) if n and me0 is not None else None,
            "client_cpu_util": round((me1 - me0) / 1000 / (m1 - m0), 3) if me0 is not None else None,
            # Unread responses pile up in the client (C-core buffers them).
            "client_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "server_pids": server_pids,
            "server_cpu_ms_per_1k_puts": (round((srv1 - srv0) / n * 1000, 1)
                                          if server_pids and n and srv0 is not None and srv1 is not None
                                          else None),
            "server_cpu_util": (round((srv1 - srv0) / 1000 / (m1 - m0), 3)
                                if server_pids and srv0 is not None and srv1 is not None else None),
            "server_rss_mb_at_end": [None if r is None else round(r, 1) for r in srv_rss],
            "servers_alive": all(cpu_ms(p) is not None for p in server_pids) if server_pids else None,
            "grpcio": grpc.__version__,
            "python": sys.version.split()[0],
        }
        out["ok"] = n > 0 and out["errors"] == 0
        if server_pids and srv1 is None:
            print(f"{ME}: a server process ({a.server_pids}) is gone", file=sys.stderr)
        if out["errors"]:
            print(f"{ME}: {out['errors']} put(s) failed in the measured window: {first_error}",
                  file=sys.stderr)
        print(json.dumps(out), flush=True)
        if n == 0:
            fail("no put succeeded in the measured window")
        return 0 if out["ok"] else 3
    finally:
        for c in calls:
            c.cancel()
        await asyncio.gather(*(c.close() for c in write_chans + watch_chans), return_exceptions=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoints", help="comma-separated host:port of the etcd v3 API")
    p.add_argument("--duration", type=float, default=10, help="measured seconds (10)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of load before measuring (2)")
    p.add_argument("--writers", type=int, default=64)
    p.add_argument("--write-conns", type=int, default=16)
    p.add_argument("--watchers", type=int, default=1000, help="never-read watch streams (0: none)")
    p.add_argument("--watch-conns", type=int, default=16)
    p.add_argument("--value-bytes", type=int, default=256)
    p.add_argument("--keys", type=int, default=10000, help="distinct keys under the prefix (10000)")
    p.add_argument("--prefix", default="/bench/")
    p.add_argument("--timeout", type=float, default=5, help="per-put deadline, seconds (5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-pids", default="", help="comma-separated PIDs whose CPU to charge per 1,000 puts")
    p.add_argument("--label", default="", help="copied into the JSON line (the system's name)")
    p.add_argument("--proto-dir", default=os.path.join(REPO, "proto", "etcd"))
    a = p.parse_args()
    for name in ("writers", "write_conns", "watch_conns", "value_bytes", "keys"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.watchers < 0 or a.duration <= 0 or a.warmup < 0:
        p.error("--watchers >= 0, --duration > 0, --warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="stalled-watchers-stubs.") as out:
        try:
            pb, pb_grpc = gen_stubs(a.proto_dir, out)
            return asyncio.run(run(a, pb, pb_grpc))
        except Failure as e:
            print(f"{ME}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{ME}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
