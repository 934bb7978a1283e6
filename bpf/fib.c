/* Both plans: what the FIB answered for a destination (table, nexthop device). For an own
 * address that is the interface holding it (eth0), though packets leave on lo.
 *
 * Raw tracepoints: their arguments are the lookup's own structures, so the namespace comes from
 * the lookup (the nexthop device's for IPv4, the `net` argument for IPv6), not from `current`.
 *   fib_table_lookup(u32 tb_id, const struct flowi4 *flp, const struct fib_nh_common *nhc, int err)
 *   fib6_table_lookup(const struct net *net, const struct fib6_result *res,
 *                     struct fib6_table *table, const struct flowi6 *flp)
 * Only output lookups are kept (flowi iif = LOOPBACK_IFINDEX): input lookups for received
 * packets answer another question.
 */

RAW_TRACEPOINT_PROBE(fib_table_lookup)
{
    if ((int)ctx->args[3] != 0)        /* a table that did not answer; the next one will */
        return 0;
    void *flp = (void *)ctx->args[1];
    void *nhc = (void *)ctx->args[2];
    if (!flp || !nhc)
        return 0;
    int iif = 0;
    bpf_probe_read_kernel(&iif, sizeof(iif), flp + OFF_FL4_IIF);
    if (iif != LOOPBACK_IFINDEX)
        return 0;
    u8 saddr[16] = {}, daddr[16] = {};
    bpf_probe_read_kernel(saddr, 4, flp + OFF_FL4_SADDR);
    bpf_probe_read_kernel(daddr, 4, flp + OFF_FL4_DADDR);
    u16 sport = 0, dport = 0;
    bpf_probe_read_kernel(&sport, sizeof(sport), flp + OFF_FL4_SPORT);
    bpf_probe_read_kernel(&dport, sizeof(dport), flp + OFF_FL4_DPORT);
    if (!lookup_matches(4, saddr, daddr, sport, dport))
        return 0;
    void *dev = read_ptr(nhc, OFF_NHC_DEV);
    u32 netns = netns_of_dev(dev);
    if (!dev || !netns_matches(netns))
        return 0;
    remember_fib(netns, 4, daddr, (u32)ctx->args[0], dev);
    return 0;
}

#ifdef HAVE_FIB6
RAW_TRACEPOINT_PROBE(fib6_table_lookup)
{
    void *net = (void *)ctx->args[0];
    void *res = (void *)ctx->args[1];
    void *table = (void *)ctx->args[2];
    void *flp = (void *)ctx->args[3];
    if (!net || !res || !flp)
        return 0;
    int iif = 0;
    bpf_probe_read_kernel(&iif, sizeof(iif), flp + OFF_FL6_IIF);
    if (iif != LOOPBACK_IFINDEX)
        return 0;
    void *nh = read_ptr(res, OFF_FIB6_RES_NH);
    if (!nh)                           /* no route (the tracepoint's err) */
        return 0;
    u8 saddr[16], daddr[16];
    bpf_probe_read_kernel(saddr, 16, flp + OFF_FL6_SADDR);
    bpf_probe_read_kernel(daddr, 16, flp + OFF_FL6_DADDR);
    u16 sport = 0, dport = 0;
    bpf_probe_read_kernel(&sport, sizeof(sport), flp + OFF_FL6_SPORT);
    bpf_probe_read_kernel(&dport, sizeof(dport), flp + OFF_FL6_DPORT);
    if (!lookup_matches(6, saddr, daddr, sport, dport))
        return 0;
    u32 netns = netns_of_net(net);
    if (!netns_matches(netns))
        return 0;
    u32 tb_id = 0;
    if (table)
        bpf_probe_read_kernel(&tb_id, sizeof(tb_id), table + OFF_FIB6_TABLE_ID);
    remember_fib(netns, 6, daddr, tb_id, read_ptr(nh, OFF_FIB6_NH_DEV));
    return 0;
}
#endif
