/* Both plans: what the FIB answered for a destination (table, nexthop device).
 * For an own address that is the interface holding it (eth0), though packets leave on lo. */

TRACEPOINT_PROBE(fib, fib_table_lookup)
{
    if (args->err != 0)               /* a table that did not answer; the next one will */
        return 0;
    /* Output lookups carry iif = LOOPBACK_IFINDEX (1); so do inputs on lo, which happen in the
     * sender's namespace. Inputs from other devices run in softirq while `current` belongs to
     * another namespace (a veth peer's SYN): its netns would be misattributed, so skip them. */
    if (args->iif != LOOPBACK_IFINDEX)
        return 0;
    u32 daddr = 0;
    __builtin_memcpy(&daddr, args->dst, 4);
    u32 saddr = 0;
    __builtin_memcpy(&saddr, args->src, 4);
    /* connect() looks up its route before the source port exists: sport may still be 0. */
    if ((args->sport || args->dport) && !port_matches(args->sport, args->dport))
        return 0;
    if (!host_matches(saddr, daddr))
        return 0;
    u32 netns = current_netns();
    if (!netns_matches(netns))
        return 0;
    struct fib_value answer = {.table = args->tb_id};
#ifdef FIB_NAME_DATA_LOC
    TP_DATA_LOC_READ_CONST(answer.dev, name, sizeof(answer.dev));
#else
    __builtin_memcpy(answer.dev, args->name, sizeof(answer.dev));
#endif
    remember_fib(netns, daddr, &answer);
    return 0;
}
