"""The stream's JSON line, made from a template (render.flow_json_fast), is the encoder's."""


def test_the_templated_json_line_is_the_encoders_for_every_shape_a_live_flow_takes():
    """flow_json_line's template against the JSON encoder: one device, two devices (a flow seen
    on two), no route, no FIB, and counts of another type (the encoder's line, not a wrong one)."""
    from routetrace import bench_session
    from routetrace.events import KEY_STRUCT, decode_entry, merge_into
    from routetrace.render import flow_json_fast, flow_json_line, json_line
    key, value = bench_session.entries(1)[0]
    flow, _ = decode_entry(key, value, "tracepoint")
    assert flow_json_fast(flow) == json_line(flow.to_dict())
    other_device = KEY_STRUCT.pack(*(KEY_STRUCT.unpack(key)[:1] + (7,) + KEY_STRUCT.unpack(key)[2:]))
    part, _ = decode_entry(other_device, value, "tracepoint")
    part.devices[0]["name"] = part.devices[0]["name"] + "\x1b"       # a name that needs escaping
    merge_into(flow, part)
    flow.xmit_devs = {"eth0": 1, "eth0\x1b": 1}
    assert len(flow.devices) == 2 and flow_json_fast(flow) == json_line(flow.to_dict())
    flow.route_type = flow.route_dev = flow.route_ifindex = flow.route_loopback = flow.fib_table = None
    assert flow_json_fast(flow) == json_line(flow.to_dict())
    flow.packets = 2.5
    assert flow_json_line(flow) == json_line(flow.to_dict()) and '"packets":2.5' in flow_json_line(flow)
    flow.packets, flow.devices[1]["bytes"] = 2, None
    assert flow_json_line(flow) == json_line(flow.to_dict())


def test_the_live_line_is_the_encoders_for_every_flow_the_session_decodes():
    """live_flow_json_line skips the value checks for the session's own flows: for every shape
    decode makes (each flag, route source, FIB or none, IPv6, names that need escaping, counts
    drained later, a second device, an extra field) it is the encoder's line exactly."""
    import itertools
    from routetrace.events import KEY_STRUCT, VALUE_STRUCT, add_device_counts, decode_entry, merge_into
    from routetrace.render import flow_json_line, json_line, live_flow_json_line
    seen = 0
    v4 = (b"\x7f\0\0\x01".ljust(16, b"\0"), b"\xc6\x33\x64\x01".ljust(16, b"\0"))
    v6 = (bytes(15) + b"\1", bytes.fromhex("20010db8000000000000000000000001"))
    for (family, (saddr, daddr)), flags, route_src, counts, names in itertools.product(
            ((4, v4), (6, v6)), (0, 0x01, 0x02, 0x04, 0x01 | 0x02 | 0x04, 0x08, 0x10), (0, 1, 2, 3),
            ((0, 0, 0, 0), (3, 180, 5, 1)),
            ((b"curl", b"eth0", b"lo", b"eth0"), (b"c\xc3\x28rl\x1b", b"veth\"0", b"l\\o", b""))):
        key = KEY_STRUCT.pack(7, 3, saddr, daddr, 40000, 8888, 17, family, 0)
        value = VALUE_STRUCT.pack(*counts, 10, 42, 254, 1, 2, 2, route_src, flags, 0, *names)
        flow, _ = decode_entry(key, value, "tracepoint")
        expected = json_line(flow.to_dict())
        assert live_flow_json_line(flow) == flow_json_line(flow) == expected, (flags, route_src, counts, names)
        # A drain adds integer counts to it, then a second device joins.
        add_device_counts(flow, flow.devices[0], 2, 100, 2, 1, 99)
        assert live_flow_json_line(flow) == json_line(flow.to_dict())
        other, _ = decode_entry(KEY_STRUCT.pack(7, 9, saddr, daddr, 40000, 8888, 17, family, 0), value, "tracepoint")
        merge_into(flow, other)
        assert len(flow.devices) == 2 and live_flow_json_line(flow) == json_line(flow.to_dict())
        seen += 1
    assert seen == 2 * 7 * 4 * 2 * 2
