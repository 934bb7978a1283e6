/* Tracepoint plan: for kernels without kprobes (CONFIG_KPROBES off, as on 6.18 here).
 *
 *   fib:fib_table_lookup  what the FIB answered for a destination (table, nexthop device)
 *   net:net_dev_queue     each packet handed to a device; route type and route device
 *                         come from the skb's dst, which ip_route_output_key_hash chose.
 */
/* Compiled after common.c (see AttachPlan.sources): bcc rewrites map calls only in its main file. */

TRACEPOINT_PROBE(fib, fib_table_lookup)
{
    if (args->err != 0)               /* a table that did not answer; the next one will */
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
    __builtin_memcpy(answer.dev, args->name, sizeof(answer.dev));
    remember_fib(netns, daddr, &answer);
    return 0;
}

TRACEPOINT_PROBE(net, net_dev_queue)
{
    return account_xmit(args->skbaddr);
}
