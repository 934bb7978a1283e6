"""Where does a connection's setup cost go, to 127.0.0.1 and to an own address? Root, bcc.

Measured in the kernel, not by the client: a BPF program times every connect() of a client
named "rtconn" (sys_enter/exit_connect: on loopback the whole handshake, SYN to the final ACK,
runs inside that call), and counts, per connect, the FIB lookups (with the table each one
searched), the packets handed to a device, and the time spent in the FIB lookups' tracepoint
window. Rounds alternate the targets in a shuffled order; each round's per-target mean is
paired, as bench pairs them (geometric mean of own/127.0.0.1, 95% t-interval).

Usage: scripts/bench-probe-cost [ROUNDS] [SECONDS]   (in a --sandbox namespace pair, as bench)
Environment: BENCH_PROBE_COST_EXTRA="198.51.100.4@lo,203.0.113.2@eth0,127.0.0.2" more targets
(added in the namespace, on the device named), BENCH_PROBE_COST_JSON=FILE the report as JSON.
The load: the connection-rate client of routetrace.loadgen, one connection at a time, RST close.
"""
import ctypes
import json
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path

from . import bench, kernel, loadgen
from .experiment import Sandbox

ROOT = Path(__file__).resolve().parent.parent

BUCKET_NS, BUCKETS = 250, 800          # connect() durations to 200 us in 0.25 us steps
STEPS = 16

PROGRAM = r"""
struct conn_t { u64 ts; u64 last; u32 target; u32 fibs; u32 xmits; u32 tables; u32 step; };
// per target and step within a connect: ns since the previous event, and what the event was
// (1000 + table id: a FIB lookup; 2: a packet to a device; 3: connect() returns)
BPF_ARRAY(steps_ns, u64, NT * STEPS);
BPF_ARRAY(steps_n, u64, NT * STEPS);
BPF_ARRAY(steps_kind, u32, NT * STEPS);
BPF_HASH(target_of, u32, u32, 16);
BPF_HASH(inflight, u32, struct conn_t, 1024);
BPF_ARRAY(hist, u64, NT * BUCKETS);
// per target: [0] connects, [1] ns total, [2] fib lookups, [3] xmits, [4] local-table lookups,
// [5] main-table lookups, [6] other-table lookups, [7] connects that failed
BPF_ARRAY(totals, u64, NT * 8);

static __always_inline int is_client(void)
{
    char comm[16];
    bpf_get_current_comm(&comm, sizeof(comm));
    return comm[0] == 'r' && comm[1] == 't' && comm[2] == 'c' && comm[3] == 'o' && comm[4] == 'n'
        && comm[5] == 'n' && comm[6] == 0;
}

static __always_inline void step(struct conn_t *c, u32 kind)
{
    u64 now = bpf_ktime_get_ns();
    u32 i = c->step;
    if (i < STEPS) {
        i += c->target * STEPS;
        u64 *p = steps_ns.lookup(&i);
        if (p)
            __sync_fetch_and_add(p, now - c->last);
        p = steps_n.lookup(&i);
        if (p)
            __sync_fetch_and_add(p, 1);
        u32 *k = steps_kind.lookup(&i);
        if (k)
            *k = kind;
    }
    c->step++;
    c->last = now;
}

static __always_inline void add(u32 idx, u64 v)
{
    u64 *p = totals.lookup(&idx);
    if (p)
        __sync_fetch_and_add(p, v);
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    if (!is_client())
        return 0;
    u32 daddr = 0;      // struct sockaddr_in: family (2), port (2), address (4)
    bpf_probe_read_user(&daddr, sizeof(daddr), (void *)args->uservaddr + 4);
    struct conn_t c = {};
    c.ts = bpf_ktime_get_ns();
    c.last = c.ts;
    u32 *t = target_of.lookup(&daddr);
    if (!t)
        return 0;
    c.target = *t;
    u32 tid = bpf_get_current_pid_tgid();
    inflight.update(&tid, &c);
    return 0;
}

RAW_TRACEPOINT_PROBE(fib_table_lookup)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct conn_t *c = inflight.lookup(&tid);
    if (!c)
        return 0;
    u32 id = (u32)ctx->args[0];          // TP_PROTO(u32 tb_id, const struct flowi4 *, ...)
    c->fibs++;
    c->tables |= id == 255 ? 1 : id == 254 ? 2 : 4;
    add(c->target * 8 + (id == 255 ? 4 : id == 254 ? 5 : 6), 1);
    step(c, 1000 + id);
    return 0;
}

RAW_TRACEPOINT_PROBE(net_dev_queue)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct conn_t *c = inflight.lookup(&tid);
    if (c) {
        c->xmits++;
        step(c, 2);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct conn_t *c = inflight.lookup(&tid);
    if (!c)
        return 0;
    if (args->ret == 0)
        step(c, 3);
    u64 d = bpf_ktime_get_ns() - c->ts;
    u32 t = c->target;
    if (args->ret != 0) {
        add(t * 8 + 7, 1);
    } else {
        add(t * 8 + 0, 1);
        add(t * 8 + 1, d);
        add(t * 8 + 2, c->fibs);
        add(t * 8 + 3, c->xmits);
        u32 b = d / BUCKET_NS;
        if (b >= BUCKETS)
            b = BUCKETS - 1;
        b += t * BUCKETS;
        u64 *h = hist.lookup(&b);
        if (h)
            __sync_fetch_and_add(h, 1);
    }
    inflight.delete(&tid);
    return 0;
}
"""


def client(host: str, port: int, seconds: float) -> dict:
    """The bench's connection loop, under the name the program looks for."""
    libc = ctypes.CDLL(None)
    libc.prctl(15, b"rtconn", 0, 0, 0)          # PR_SET_NAME
    return loadgen.conn_loop(host, port, seconds)


def read_totals(b, nt) -> list[list[int]]:
    t = b[b"totals"]
    flat = [t[t.Key(i)].value for i in range(8 * nt)]
    return [flat[i * 8:(i + 1) * 8] for i in range(nt)]


def read_hist(b, nt) -> list[list[int]]:
    h = b[b"hist"]
    flat = [h[h.Key(i)].value for i in range(nt * BUCKETS)]
    return [flat[i * BUCKETS:(i + 1) * BUCKETS] for i in range(nt)]


def read_steps(b, nt):
    ns, n, kind = b[b"steps_ns"], b[b"steps_n"], b[b"steps_kind"]
    out = []
    for t in range(nt):
        rows = []
        for i in range(STEPS):
            k = t * STEPS + i
            cnt = n[n.Key(k)].value
            if cnt:
                kd = kind[kind.Key(k)].value
                what = f"FIB lookup (table {kd - 1000})" if kd >= 1000 else {2: "packet to device", 3: "connect() returns"}.get(kd, "?")
                rows.append((i + 1, what, ns[ns.Key(k)].value / cnt, cnt))
        out.append(rows)
    return out


def hist_percentile(counts: list[int], q: float) -> float:
    total = sum(counts)
    need, acc = q / 100 * total, 0
    for i, c in enumerate(counts):
        acc += c
        if acc >= need:
            return (i + 0.5) * BUCKET_NS / 1e3
    return float("nan")


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    import bcc
    facts = kernel.gather(prepare_headers=True)
    if not facts.headers.matches:
        os.environ["BCC_KERNEL_SOURCE"] = str(facts.headers.path)
    extra = [a for a in os.environ.get("BENCH_PROBE_COST_EXTRA", "").split(",") if a]
    cflags = ["-w", f"-DBUCKET_NS={BUCKET_NS}", f"-DBUCKETS={BUCKETS}", f"-DSTEPS={STEPS}",
              f"-DNT={2 + len(extra)}"]
    cpu = str((os.cpu_count() or 1) - 1)
    base = 9300
    with Sandbox() as sb:
        print(sb.describe(), file=sys.stderr)
        acceptor = subprocess.Popen(["ip", "netns", "exec", sb.host, "taskset", "-c", cpu, sys.executable, "-m",
                                     "routetrace.loadgen", "serve", str(base), "--accept-only"],
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert acceptor.stdout.readline().strip() == "ready"
            # Extra targets (BENCH_PROBE_COST_EXTRA="127.0.0.2,198.51.100.3,203.0.113.1@lo"): addresses
            # added in the sandbox namespace, on eth0 or on lo, to tell the address from the device.
            targets = ["127.0.0.1", sb.own_addr]
            for spec in extra:
                addr, _, dev = spec.partition("@")
                if not addr.startswith("127."):
                    subprocess.run(["ip", "-n", sb.host, "addr", "add", f"{addr}/32", "dev", dev or "eth0"], check=True)
                targets.append(addr)
            b = bcc.BPF(text=PROGRAM, cflags=cflags)
            tmap = b[b"target_of"]
            for i, addr in enumerate(targets):
                tmap[tmap.Key(struct.unpack("=I", socket.inet_aton(addr))[0])] = tmap.Leaf(i)
            per_round = {t: [] for t in targets}
            rates = {t: [] for t in targets}
            user = {t: [] for t in targets}
            for r in range(rounds):
                order = list(targets)
                random.shuffle(order)
                for target in order:
                    i = targets.index(target)
                    before = read_totals(b, len(targets))[i]
                    out = subprocess.run(["ip", "netns", "exec", sb.host, "taskset", "-c", cpu, sys.executable,
                                          "-m", "routetrace.connect_cost", "--client", target, str(base + loadgen.PORT_ACCEPT),
                                          str(seconds)], capture_output=True, text=True, check=True, cwd=ROOT)
                    res = json.loads(out.stdout)
                    after = read_totals(b, len(targets))[i]
                    d = [a - x for a, x in zip(after, before)]
                    per_round[target].append({"connects": d[0], "mean_us": d[1] / d[0] / 1e3 if d[0] else None,
                                              "fibs_per_connect": d[2] / d[0] if d[0] else None,
                                              "xmits_per_connect": d[3] / d[0] if d[0] else None,
                                              "local_table": d[4], "main_table": d[5], "other_table": d[6],
                                              "failed": d[7]})
                    rates[target].append(res["per_s"])
                    user[target].append(1e6 * res["user_s"] / res["connections"])
                print(f"round {r + 1}/{rounds} done", file=sys.stderr)
            hist = read_hist(b, len(targets))
            steps = read_steps(b, len(targets))
            b.cleanup()
        finally:
            acceptor.kill()
            acceptor.wait()
    report = {"rounds": rounds, "seconds": seconds, "cpu": cpu, "loadavg": open("/proc/loadavg").read().split()[:3],
              "per_round": per_round}
    lines = []
    for t, h in zip(targets, hist):
        rows = per_round[t]
        lines.append(f"{t:<14} connect() in kernel: mean {sum(x['mean_us'] for x in rows) / len(rows):.2f} us, "
                     f"p50 {hist_percentile(h, 50):.2f} us, p90 {hist_percentile(h, 90):.2f} us, "
                     f"p99 {hist_percentile(h, 99):.2f} us; "
                     f"FIB lookups/connect {sum(x['fibs_per_connect'] for x in rows) / len(rows):.2f} "
                     f"(local table {sum(x['local_table'] for x in rows)}, main {sum(x['main_table'] for x in rows)}, "
                     f"other {sum(x['other_table'] for x in rows)}), "
                     f"packets/connect {sum(x['xmits_per_connect'] for x in rows) / len(rows):.2f}; "
                     f"rate median {sorted(rates[t])[len(rates[t]) // 2]:.0f}/s, "
                     f"client user CPU {sum(user[t]) / len(user[t]):.2f} us/conn")
    lines.append("steps inside connect(): mean ns since the previous event, per target: " + " | ".join(targets))
    for row in zip(*steps):
        lines.append(f"  {row[0][0]:>2} {row[0][1]:<24} " + " | ".join(f"{r[1][:14] if r[1] != row[0][1] else ''}{r[2]:7.0f}"
                                                               for r in row))
    report["steps"] = {t: s_ for t, s_ in zip(targets, steps)}
    report["ratios"] = {}
    for own in targets[1:]:
        mean_ratio = bench.paired_ratio([x["mean_us"] for x in per_round["127.0.0.1"]], [x["mean_us"] for x in per_round[own]])
        rate_ratio = bench.paired_ratio(rates["127.0.0.1"], rates[own])
        lines.append(f"{own:<14} / 127.0.0.1: connect() time {mean_ratio} "
                     f"({'measurable' if mean_ratio.measurable else 'no measurable difference'}); "
                     f"connection rate {rate_ratio} ({'measurable' if rate_ratio.measurable else 'no measurable difference'})")
        report["ratios"][own] = {"connect_time": mean_ratio.to_dict(), "rate": rate_ratio.to_dict()}
    report["histogram_p50_us"] = {t: hist_percentile(h, 50) for t, h in zip(targets, hist)}
    print("\n".join(lines))
    if os.environ.get("BENCH_PROBE_COST_JSON"):
        Path(os.environ["BENCH_PROBE_COST_JSON"]).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        print(json.dumps(client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
