/* The floor for `routetrace bench --trace` and scripts/bench-xmit-cost: the least a program on
 * routetrace's hook can cost. One per-CPU array increment per packet handed to a device, nothing
 * else (no filter, no skb read, no map lookup by key). FLOOR_BTF: the BTF-typed tracepoint (what
 * routetrace's tracepoint plan uses where the kernel takes it; loaded by tracer.py, hence no bcc
 * prefix); FLOOR_RAW: the raw tracepoint; neither: the regular tracepoint, which copies its
 * record first.
 */

BPF_PERCPU_ARRAY(floor_count, u64, 1);

/* FLOOR_SKB_LEN (tests): count only skbs of that length -- a test's own packets -- read at
 * OFF_SKB_LEN (from BTF) with a helper call, whatever the hook. */
static __always_inline int floor_hit(void *skb)
{
#ifdef FLOOR_SKB_LEN
    u32 len = 0;
    bpf_probe_read_kernel(&len, sizeof(len), (u8 *)skb + OFF_SKB_LEN);
    if (len != FLOOR_SKB_LEN)
        return 0;
#endif
    int zero = 0;
    u64 *v = floor_count.lookup(&zero);
    if (v)
        *v += 1;
    return 0;
}

#if defined(FLOOR_BTF)
int floor_btf(u64 *ctx)
{
    return floor_hit((void *)ctx[0]);
}
#elif defined(FLOOR_RAW)
RAW_TRACEPOINT_PROBE(net_dev_queue)
{
    return floor_hit((void *)ctx->args[0]);
}
#else
TRACEPOINT_PROBE(net, net_dev_queue)
{
    return floor_hit(args->skbaddr);
}
#endif
