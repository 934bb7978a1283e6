/* Kprobe plan: the design card's probes, for kernels with CONFIG_KPROBES.
 *
 *   ip_route_output_key_hash(net, fl4, skb)   entry: remember net and fl4; return: the
 *       rtable it chose (route type, rt->dst.dev) for fl4's destination
 *   __dev_queue_xmit(skb, sb_dev)  (dev_queue_xmit before 5.18): the transmit device.
 *       At entry the skb still carries its route on every device.
 *
 * Compiled after common.c and fib.c (AttachPlan.sources), with ROUTE_DECISIONS defined.
 */

struct route_call {
    void *net;
    void *fl4;
};

BPF_HASH(route_calls, u64, struct route_call, 10240);

int route_entry(struct pt_regs *ctx)
{
    struct route_call call = {.net = (void *)PT_REGS_PARM1(ctx), .fl4 = (void *)PT_REGS_PARM2(ctx)};
    u64 id = bpf_get_current_pid_tgid();
    route_calls.update(&id, &call);
    return 0;
}

int route_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct route_call *found = route_calls.lookup(&id);
    if (!found)
        return 0;
    struct route_call call = *found;
    route_calls.delete(&id);

    unsigned long rt = PT_REGS_RC(ctx);
    if (!rt || rt >= (unsigned long)-4095)      /* NULL or ERR_PTR: no route */
        return 0;

    u8 saddr[16] = {}, daddr[16] = {};
    u16 sport = 0, dport = 0;
    bpf_probe_read_kernel(saddr, 4, call.fl4 + OFF_FL4_SADDR);
    bpf_probe_read_kernel(daddr, 4, call.fl4 + OFF_FL4_DADDR);
    bpf_probe_read_kernel(&sport, sizeof(sport), call.fl4 + OFF_FL4_SPORT);
    bpf_probe_read_kernel(&dport, sizeof(dport), call.fl4 + OFF_FL4_DPORT);
    if (!lookup_matches(4, saddr, daddr, sport, dport))
        return 0;
    u32 netns = netns_of_net(call.net);
    if (!netns_matches(netns))
        return 0;

    struct route_key k = {.netns = netns, .family = 4};
    __builtin_memcpy(k.daddr, daddr, 16);
    struct route_value v = {};
    bpf_probe_read_kernel(&v.rt_type, 1, (void *)rt + OFF_RTABLE_RT_TYPE);
    void *dev = read_ptr((void *)rt, OFF_DST_DEV);
    if (dev) {
        bpf_probe_read_kernel(&v.ifindex, sizeof(v.ifindex), dev + OFF_NETDEV_IFINDEX);
        bpf_probe_read_kernel(&v.dev, DEVNAME_LEN, dev + OFF_NETDEV_NAME);
        v.loopback = dev_loopback(dev) != 0;
    }
    route_answers.update(&k, &v);
    return 0;
}

int xmit_entry(struct pt_regs *ctx)
{
    return account_xmit((void *)PT_REGS_PARM1(ctx));
}
