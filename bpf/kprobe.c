/* Kprobe plan: the design card's probes, for kernels with CONFIG_KPROBES (x86_64 only: see below).
 *
 *   ip_route_output_key_hash(net, fl4, skb)   entry: remember net and fl4; return: the
 *       rtable it chose (route type, rt->dst.dev), filed under the flow fl4 describes
 *   __dev_queue_xmit(skb, sb_dev)  (dev_queue_xmit before 5.18): the transmit device.
 *       At entry the skb still carries its route on every device.
 *
 * Pairing an entry with its return. A call is identified by its stack frame: the kernel stack
 * pointer at entry is unique machine-wide among calls in progress (each task has its own stack,
 * each CPU its own IRQ and softirq stacks, and a nested call -- a softirq reply routed inside a
 * process-context connect on the same CPU -- sits deeper in the stack). pid_tgid is not: a
 * softirq runs under whichever task it interrupted (pid 0 on every idle CPU). At the return
 * probe the stack pointer is the entry's plus RET_SP_DELTA: the function's `ret` popped the
 * return address (8 bytes) and the x86_64 kretprobe trampoline (kretprobe_trampoline, later
 * arch_rethook_trampoline) reports the stack pointer as it was right after that `ret`. Measured
 * in the VMs on 5.10, 6.1, 6.12 and Debian unstable: always 8 (README, "Limits"). The entry also
 * records pid_tgid, so a frame another task left behind is never taken for this one.
 *
 * A return that finds no entry of its own, or an entry whose return never came (the next call in
 * the same frame finds it still there), is counted (STAT_ROUTE_UNPAIRED) and files nothing: no
 * answer is better than another call's.
 *
 * Compiled after common.c and fib.c (AttachPlan.sources), with ROUTE_DECISIONS defined.
 */

#ifndef RET_SP_DELTA
#define RET_SP_DELTA 8
#endif

struct route_call {
    void *net;
    void *fl4;
    u64 pid_tgid;
};

/* LRU: a frame whose return was missed stays behind until the same frame is used again; under
 * pressure the oldest such leftovers go first (calls in progress are a handful per CPU). */
BPF_TABLE("lru_hash", u64, struct route_call, route_calls, 10240);

/* The flow a lookup was made for, as fl4 holds it now: the lookup fills in saddr when the
 * caller left it 0 (read at the return for that reason). Ports only for TCP and UDP: other
 * protocols keep ICMP type and code there, and their packets are keyed with ports 0. */
static __always_inline void route_key_of(void *fl4, u32 netns, struct route_key *k)
{
    k->netns = netns;
    bpf_probe_read_kernel(&k->saddr, sizeof(k->saddr), fl4 + OFF_FL4_SADDR);
    bpf_probe_read_kernel(&k->daddr, sizeof(k->daddr), fl4 + OFF_FL4_DADDR);
    bpf_probe_read_kernel(&k->proto, sizeof(k->proto), fl4 + OFF_FL4_PROTO);
    if (k->proto == PROTO_TCP || k->proto == PROTO_UDP) {
        bpf_probe_read_kernel(&k->sport, sizeof(k->sport), fl4 + OFF_FL4_SPORT);
        bpf_probe_read_kernel(&k->dport, sizeof(k->dport), fl4 + OFF_FL4_DPORT);
        k->sport = bpf_ntohs(k->sport);
        k->dport = bpf_ntohs(k->dport);
    }
}

int route_entry(struct pt_regs *ctx)
{
    u64 frame = PT_REGS_SP(ctx);
    struct route_call call = {.net = (void *)PT_REGS_PARM1(ctx), .fl4 = (void *)PT_REGS_PARM2(ctx),
                              .pid_tgid = bpf_get_current_pid_tgid()};
    if (route_calls.insert(&frame, &call) != 0) {
        /* This frame's previous call never returned through the probe. */
        count_stat(STAT_ROUTE_UNPAIRED, 1);
        route_calls.update(&frame, &call);
    }
    /* An answer already filed for this flow is older than this lookup: if this one is never
     * paired, the flow must get no answer rather than the old one. Known only when the caller
     * gave the source address (connect's final lookup, replies); else the lookup picks it. */
    struct route_key k = {};
    route_key_of(call.fl4, netns_of_net(call.net), &k);
    if (k.saddr)
        route_answers.delete(&k);
    return 0;
}

int route_return(struct pt_regs *ctx)
{
    u64 frame = PT_REGS_SP(ctx) - RET_SP_DELTA;
    struct route_call *found = route_calls.lookup(&frame);
    if (!found || found->pid_tgid != bpf_get_current_pid_tgid()) {
        count_stat(STAT_ROUTE_UNPAIRED, 1);
        return 0;
    }
    struct route_call call = *found;
    route_calls.delete(&frame);

    unsigned long rt = PT_REGS_RC(ctx);
    if (!rt || rt >= (unsigned long)-4095)      /* NULL or ERR_PTR: no route */
        return 0;

    struct route_key k = {};
    route_key_of(call.fl4, netns_of_net(call.net), &k);
    u8 saddr[16] = {}, daddr[16] = {};
    __builtin_memcpy(saddr, &k.saddr, 4);
    __builtin_memcpy(daddr, &k.daddr, 4);
    if (!lookup_matches(4, saddr, daddr, bpf_htons(k.sport), bpf_htons(k.dport)) || !netns_matches(k.netns))
        return 0;

    struct route_value v = {};
    bpf_probe_read_kernel(&v.rt_type, 1, (void *)rt + OFF_RTABLE_RT_TYPE);
    void *dev = read_ptr((void *)rt, OFF_DST_DEV);
    if (dev) {
        bpf_probe_read_kernel(&v.ifindex, sizeof(v.ifindex), dev + OFF_NETDEV_IFINDEX);
        bpf_probe_read_kernel(&v.dev, DEVNAME_LEN, dev + OFF_NETDEV_NAME);
        v.loopback = dev_loopback(dev, 0) != 0;
    }
    route_answers.update(&k, &v);
    return 0;
}

int xmit_entry(struct pt_regs *ctx)
{
    return account_xmit((void *)PT_REGS_PARM1(ctx), 0);
}
