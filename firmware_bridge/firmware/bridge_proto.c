/* bridge_proto.c - protocol core (C99, no heap, no OS calls). */
#include "bridge_proto.h"

#include <string.h>

uint16_t bp_crc16(const uint8_t *data, size_t len)
{
    /* CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection. */
    uint16_t crc = 0xFFFFu;
    while (len--) {
        int i;
        crc ^= (uint16_t)((uint16_t)*data++ << 8);
        for (i = 0; i < 8; i++)
            crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
    }
    return crc;
}

size_t bp_cobs_encode(const uint8_t *in, size_t len, uint8_t *out)
{
    size_t r = 0, w = 1, code_at = 0;
    uint8_t code = 1;
    while (r < len) {
        if (in[r] == 0) {
            out[code_at] = code;
            code = 1;
            code_at = w++;
        } else {
            out[w++] = in[r];
            if (++code == 0xFF) {
                out[code_at] = code;
                code = 1;
                code_at = w++;
            }
        }
        r++;
    }
    out[code_at] = code;
    return w;
}

int bp_cobs_decode(const uint8_t *in, size_t len, uint8_t *out, size_t cap)
{
    size_t r = 0, w = 0;
    while (r < len) {
        uint8_t code = in[r++], i;
        if (code == 0)
            return -1;
        for (i = 1; i < code; i++) {
            if (r >= len || in[r] == 0 || w >= cap)
                return -1;
            out[w++] = in[r++];
        }
        if (code != 0xFF && r < len) {
            if (w >= cap)
                return -1;
            out[w++] = 0;
        }
    }
    return (int)w;
}

static void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void pack_state(bp_device *dev, uint8_t *p)
{
    bp_instrument ins;
    uint32_t age = 0xFFFFu;
    memset(&ins, 0, sizeof ins);
    dev->cb.get_state(dev->cb.user, &ins);
    if (dev->hb_valid) {
        age = dev->now_ms - dev->last_hb_ms;
        if (age > 0xFFFFu)
            age = 0xFFFFu;
    }
    p[0] = (uint8_t)((ins.shutter_open ? 1u : 0u) | (dev->safe ? 2u : 0u) | (ins.alarm_code ? 4u : 0u));
    p[1] = ins.attenuation;
    p[2] = ins.gain;
    p[3] = 0;
    put_u32(p + 4, ins.exposure_us);
    put_u32(p + 8, (uint32_t)ins.beam_x_nm);
    put_u32(p + 12, (uint32_t)ins.beam_y_nm);
    put_u16(p + 16, ins.alarm_code);
    put_u16(p + 18, (uint16_t)age);
    put_u32(p + 20, dev->applied_count);
    put_u32(p + 24, dev->boot_id);
}

static void send_frame(bp_device *dev, uint8_t type, uint32_t session, uint32_t seq,
                       const uint8_t *payload, size_t len)
{
    uint8_t raw[BP_MAX_RAW];
    uint8_t enc[BP_MAX_ENCODED + 1];
    size_t n;
    uint16_t crc;
    if (len > BP_MAX_PAYLOAD)
        return;
    raw[0] = BP_PROTOCOL_VERSION;
    raw[1] = type;
    put_u32(raw + 2, session);
    put_u32(raw + 6, seq);
    if (len)
        memcpy(raw + BP_HEADER_LEN, payload, len);
    crc = bp_crc16(raw, BP_HEADER_LEN + len);
    put_u16(raw + BP_HEADER_LEN + len, crc);
    n = bp_cobs_encode(raw, BP_HEADER_LEN + len + BP_CRC_LEN, enc);
    enc[n++] = 0;
    dev->cb.write(dev->cb.user, enc, n);
}

static void send_reply(bp_device *dev, uint8_t type, uint32_t session, uint32_t seq,
                       uint8_t cmd, uint8_t code)
{
    uint8_t p[BP_REPLY_LEN];
    p[0] = cmd;
    p[1] = code;
    pack_state(dev, p + 2);
    send_frame(dev, type, session, seq, p, sizeof p);
}

void bp_init(bp_device *dev, const bp_callbacks *cb, uint32_t boot_id, const char *name,
             const char *device_id)
{
    memset(dev, 0, sizeof *dev);
    dev->cb = *cb;
    dev->boot_id = boot_id;
    dev->name = name ? name : "c-firmware";
    dev->device_id = device_id ? device_id : "";
    dev->watchdog_ms = BP_DEFAULT_WATCHDOG_MS;
}

void bp_tick(bp_device *dev, uint32_t now_ms)
{
    dev->now_ms = now_ms;
    if (dev->session && !dev->safe && dev->hb_valid
        && (uint32_t)(now_ms - dev->last_hb_ms) > dev->watchdog_ms) {
        uint8_t st[BP_STATE_LEN];
        dev->safe = 1;
        dev->hb_since_safe = 0;
        dev->cb.enter_safe_state(dev->cb.user);
        pack_state(dev, st);
        send_frame(dev, BP_MSG_TELEMETRY, dev->session, 0, st, sizeof st); /* report it */
    }
}

static void feed_watchdog(bp_device *dev)
{
    dev->last_hb_ms = dev->now_ms;
    dev->hb_valid = 1;
    dev->hb_since_safe = 1;
}

static bp_dedup_entry *dedup_find(bp_session *s, uint32_t seq)
{
    unsigned i;
    for (i = 0; i < BP_DEDUP_SIZE; i++)
        if (s->dedup[i].valid && s->dedup[i].seq == seq)
            return &s->dedup[i];
    return NULL;
}

/* History of `session`; an unknown session takes a free or the least recently
 * used slot and starts at the host's seq floor: a seq the host may have sent
 * before is never applied by a device that does not remember it. */
static bp_session *session_attach(bp_device *dev, uint32_t session, uint32_t floor)
{
    unsigned i;
    bp_session *s = NULL;
    for (i = 0; i < BP_SESSIONS; i++)
        if (dev->sessions[i].session == session)
            s = &dev->sessions[i];
    if (!s) {
        s = &dev->sessions[0];
        for (i = 0; i < BP_SESSIONS; i++) {
            bp_session *c = &dev->sessions[i];
            if (c->session == 0) { s = c; break; }
            if (c->last_used < s->last_used) s = c;
        }
        memset(s, 0, sizeof *s);
        s->session = session;
        s->highest_seq = floor;
    }
    s->last_used = ++dev->use_counter;
    return s;
}

static size_t cut_utf8(const char *t, size_t limit)
{
    /* length of t cut to `limit` bytes without splitting a UTF-8 sequence */
    size_t n = strlen(t);
    if (n <= limit)
        return n;
    n = limit;
    while (n > 0 && ((uint8_t)t[n] & 0xC0u) == 0x80u)
        n--;
    return n;
}

static uint8_t execute(bp_device *dev, uint8_t cmd, const uint8_t *args, uint8_t len)
{
    if (cmd < BP_CMD_SET_ATTENUATION || cmd > BP_CMD_RESUME)
        return BP_ERR_UNKNOWN_COMMAND;
    if (dev->safe) {
        int closing = cmd == BP_CMD_SHUTTER && len == 1 && args[0] == 0;
        if (cmd != BP_CMD_QUERY_STATE && cmd != BP_CMD_RAISE_ALARM && cmd != BP_CMD_RESUME
            && !closing)
            return BP_ERR_SAFE_STATE;
    }
    if (cmd == BP_CMD_QUERY_STATE || cmd == BP_CMD_RESUME) {
        if (len)
            return BP_ERR_BAD_ARGS;
        if (cmd == BP_CMD_RESUME && dev->safe) {
            /* Leave safe state only while heartbeats flow again. */
            if (!dev->hb_since_safe || (uint32_t)(dev->now_ms - dev->last_hb_ms) > dev->watchdog_ms)
                return BP_ERR_SAFE_STATE;
            dev->safe = 0;
            dev->cb.resume(dev->cb.user);
        }
        return BP_OK;
    }
    return dev->cb.apply(dev->cb.user, cmd, args, len);
}

static void handle_frame(bp_device *dev, const uint8_t *raw, size_t n)
{
    uint8_t type;
    uint32_t session, seq;
    const uint8_t *payload = raw + BP_HEADER_LEN;
    size_t plen = n - BP_HEADER_LEN - BP_CRC_LEN;
    bp_dedup_entry *e;
    uint8_t cmd = plen ? payload[0] : 0;

    type = raw[1];
    session = get_u32(raw + 2);
    seq = get_u32(raw + 6);
    if (raw[0] != BP_PROTOCOL_VERSION) {
        dev->counters.bad_version++;
        send_reply(dev, BP_MSG_NACK, session, seq, 0, BP_ERR_BAD_VERSION);
        return;
    }
    if (type == BP_MSG_HELLO) {
        uint8_t p[4 + BP_STATE_LEN + 1 + BP_DEVICE_ID_MAX + BP_NAME_MAX];
        size_t nl = cut_utf8(dev->name, BP_NAME_MAX);
        size_t il = cut_utf8(dev->device_id, BP_DEVICE_ID_MAX);
        uint16_t req = plen >= 2 ? (uint16_t)(payload[0] | (payload[1] << 8)) : 0;
        uint32_t floor = plen >= 6 ? get_u32(payload + 2) : 0;
        if (session == 0)
            return; /* reserved ("no host"): it would disarm the watchdog */
        dev->active = session_attach(dev, session, floor);
        dev->session = session;
        if (req == 0)
            dev->watchdog_ms = BP_DEFAULT_WATCHDOG_MS;
        else
            dev->watchdog_ms = req < BP_MIN_WATCHDOG_MS ? BP_MIN_WATCHDOG_MS
                             : req > BP_MAX_WATCHDOG_MS ? BP_MAX_WATCHDOG_MS : req;
        feed_watchdog(dev);
        p[0] = BP_PROTOCOL_VERSION;
        p[1] = (uint8_t)BP_DEDUP_SIZE;
        put_u16(p + 2, dev->watchdog_ms);
        pack_state(dev, p + 4);
        p[4 + BP_STATE_LEN] = (uint8_t)il;
        memcpy(p + 5 + BP_STATE_LEN, dev->device_id, il);
        memcpy(p + 5 + BP_STATE_LEN + il, dev->name, nl);
        send_frame(dev, BP_MSG_HELLO_ACK, dev->session, seq, p, 5 + BP_STATE_LEN + il + nl);
        return;
    }
    if (type != BP_MSG_HEARTBEAT && type != BP_MSG_COMMAND && type != BP_MSG_STATUS_QUERY)
        return; /* not addressed to the device */
    if (dev->session == 0 || session != dev->session || !dev->active) {
        dev->counters.bad_session++;
        send_reply(dev, BP_MSG_NACK, session, seq, cmd, BP_ERR_BAD_SESSION);
        return;
    }
    if (type == BP_MSG_HEARTBEAT) {
        uint8_t st[BP_STATE_LEN];
        feed_watchdog(dev);
        pack_state(dev, st);
        send_frame(dev, BP_MSG_TELEMETRY, session, seq, st, sizeof st);
        return;
    }
    e = dedup_find(dev->active, seq);
    if (e) { /* repeat or status query: the original answer, never re-applied */
        dev->counters.duplicates++;
        send_frame(dev, e->type, session, seq, e->payload, e->len);
        return;
    }
    if (type == BP_MSG_STATUS_QUERY) {
        uint8_t p[1 + BP_STATE_LEN];
        p[0] = seq > dev->active->highest_seq ? BP_FATE_NOT_RECEIVED : BP_FATE_UNKNOWN;
        pack_state(dev, p + 1);
        send_frame(dev, BP_MSG_STATUS, session, seq, p, sizeof p);
        return;
    }
    if (seq <= dev->active->highest_seq) { /* old, evicted or below the floor: never apply */
        send_reply(dev, BP_MSG_NACK, session, seq, cmd, BP_ERR_STALE_SEQ);
        return;
    }
    dev->active->highest_seq = seq;
    {
        uint8_t code = plen ? execute(dev, cmd, payload + 1, (uint8_t)(plen - 1))
                            : BP_ERR_UNKNOWN_COMMAND;
        uint8_t mtype = code == BP_OK ? BP_MSG_ACK : BP_MSG_NACK;
        e = &dev->active->dedup[dev->active->dedup_next];
        dev->active->dedup_next = (dev->active->dedup_next + 1u) % BP_DEDUP_SIZE;
        if (code == BP_OK) {
            dev->applied_count++;
            if (dev->cb.applied)
                dev->cb.applied(dev->cb.user, session, seq, cmd, payload + 1, (uint8_t)(plen - 1));
        }
        e->valid = 1;
        e->seq = seq;
        e->type = mtype;
        e->len = BP_REPLY_LEN;
        e->payload[0] = cmd;
        e->payload[1] = code;
        pack_state(dev, e->payload + 2);
        send_frame(dev, mtype, session, seq, e->payload, e->len);
    }
}

static void handle_chunk(bp_device *dev)
{
    uint8_t raw[BP_MAX_RAW];
    int n = bp_cobs_decode(dev->rx, dev->rx_len, raw, sizeof raw);
    uint16_t crc;
    if (n < 0) {
        dev->counters.cobs_errors++;
        return;
    }
    if ((size_t)n < BP_HEADER_LEN + BP_CRC_LEN) {
        dev->counters.crc_errors++;
        return;
    }
    crc = (uint16_t)(raw[n - 2] | (raw[n - 1] << 8));
    if (bp_crc16(raw, (size_t)n - BP_CRC_LEN) != crc) {
        dev->counters.crc_errors++;
        return;
    }
    dev->counters.frames++;
    handle_frame(dev, raw, (size_t)n);
}

void bp_feed(bp_device *dev, const uint8_t *data, size_t len, uint32_t now_ms)
{
    size_t i;
    bp_tick(dev, now_ms);
    for (i = 0; i < len; i++) {
        uint8_t b = data[i];
        if (b == 0) {
            if (dev->rx_len && !dev->rx_discard)
                handle_chunk(dev);
            dev->rx_len = 0;
            dev->rx_discard = 0;
        } else if (!dev->rx_discard) {
            if (dev->rx_len >= sizeof dev->rx) {
                dev->counters.oversize++; /* garbage: skip to the next delimiter */
                dev->rx_discard = 1;
                dev->rx_len = 0;
            } else {
                dev->rx[dev->rx_len++] = b;
            }
        }
    }
}
