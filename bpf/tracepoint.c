/* Tracepoint plan: for kernels without kprobes (CONFIG_KPROBES off, as on 6.18 here).
 *
 *   net:net_dev_queue     each packet handed to a device; route type and route device
 *                         come from the skb's dst, which ip_route_output_key_hash chose
 *                         (or the sending socket's cached route, see route_of()).
 *
 * Compiled after common.c and fib.c (AttachPlan.sources): bcc rewrites map calls only in
 * its main file, so the plan's files are one unit rather than #includes.
 */

TRACEPOINT_PROBE(net, net_dev_queue)
{
    return account_xmit(args->skbaddr);
}
