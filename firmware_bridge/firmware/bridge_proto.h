/*
 * bridge_proto.h - device side of the firmware_bridge protocol (portable C99).
 *
 * No heap, no OS calls: the application supplies bytes (bp_feed), a
 * millisecond tick (bp_tick) and callbacks that drive the instrument and
 * write bytes to the serial line. See firmware_bridge/README.md for the
 * protocol specification; numbers here mirror firmware_bridge/messages.py.
 */
#ifndef BRIDGE_PROTO_H
#define BRIDGE_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define BP_PROTOCOL_VERSION 1u
#define BP_HEADER_LEN 10u
#define BP_CRC_LEN 2u
#define BP_MAX_PAYLOAD 96u
#define BP_MAX_RAW (BP_HEADER_LEN + BP_MAX_PAYLOAD + BP_CRC_LEN)
#define BP_MAX_ENCODED (BP_MAX_RAW + BP_MAX_RAW / 254u + 1u)
#define BP_STATE_LEN 28u
#define BP_REPLY_LEN (2u + BP_STATE_LEN)
#ifndef BP_DEDUP_SIZE
#define BP_DEDUP_SIZE 16u
#endif
/* Host sessions whose history (highest seq + stored answers) the device keeps:
 * a takeover by another host must not make it forget what it applied. */
#ifndef BP_SESSIONS
#define BP_SESSIONS 4u
#endif
#define BP_DEVICE_ID_MAX 24u
#define BP_NAME_MAX 32u
#define BP_DEFAULT_WATCHDOG_MS 1000u
#define BP_MIN_WATCHDOG_MS 50u
#define BP_MAX_WATCHDOG_MS 10000u
#define BP_WATCHDOG_ALARM 0xFFFFu

/* message types */
enum {
    BP_MSG_HELLO = 0x01, BP_MSG_HELLO_ACK = 0x02,
    BP_MSG_COMMAND = 0x10, BP_MSG_ACK = 0x11, BP_MSG_NACK = 0x12,
    BP_MSG_HEARTBEAT = 0x20, BP_MSG_TELEMETRY = 0x21,
    BP_MSG_STATUS_QUERY = 0x22, BP_MSG_STATUS = 0x23
};

/* NACK error codes */
enum {
    BP_OK = 0, BP_ERR_UNKNOWN_COMMAND = 1, BP_ERR_BAD_ARGS = 2, BP_ERR_OUT_OF_RANGE = 3,
    BP_ERR_SAFE_STATE = 4, BP_ERR_BAD_SESSION = 5, BP_ERR_STALE_SEQ = 6,
    BP_ERR_BAD_VERSION = 7, BP_ERR_INTERNAL = 8
};

/* STATUS fates */
enum { BP_FATE_NOT_RECEIVED = 0, BP_FATE_UNKNOWN = 1 };

/* command ids */
enum {
    BP_CMD_SET_ATTENUATION = 0x01, BP_CMD_SET_EXPOSURE = 0x02, BP_CMD_SET_GAIN = 0x03,
    BP_CMD_SHUTTER = 0x04, BP_CMD_RECENTRE_BEAM = 0x05, BP_CMD_RAISE_ALARM = 0x06,
    BP_CMD_QUERY_STATE = 0x07, BP_CMD_RESUME = 0x08
};

/* Instrument part of the state block, filled by the application. */
typedef struct {
    uint8_t shutter_open;
    uint8_t attenuation;
    uint8_t gain;
    uint32_t exposure_us;
    int32_t beam_x_nm;
    int32_t beam_y_nm;
    uint16_t alarm_code; /* 0 = no alarm */
} bp_instrument;

typedef struct {
    /* Apply an instrument command (never QUERY_STATE/RESUME, the core does
     * those). Return BP_OK or an error code; on error nothing may change. */
    uint8_t (*apply)(void *user, uint8_t cmd, const uint8_t *args, uint8_t len);
    /* Called once per command actually applied (for logging/metrics). */
    void (*applied)(void *user, uint32_t session, uint32_t seq, uint8_t cmd,
                    const uint8_t *args, uint8_t len);
    /* Put the instrument into the documented safe state. */
    void (*enter_safe_state)(void *user);
    /* Leaving safe state after RESUME: clear the watchdog alarm. */
    void (*resume)(void *user);
    void (*get_state)(void *user, bp_instrument *out);
    /* Write one complete encoded frame (including the 0x00 delimiter). */
    void (*write)(void *user, const uint8_t *data, size_t len);
    void *user;
} bp_callbacks;

typedef struct {
    uint8_t valid, type, len;
    uint32_t seq;
    uint8_t payload[BP_REPLY_LEN];
} bp_dedup_entry;

typedef struct {
    uint32_t session;       /* 0 = free slot */
    uint32_t highest_seq;   /* never apply a seq <= this */
    uint32_t last_used;     /* LRU stamp */
    unsigned dedup_next;
    bp_dedup_entry dedup[BP_DEDUP_SIZE];
} bp_session;

typedef struct {
    uint32_t frames, cobs_errors, crc_errors, oversize, bad_session, duplicates, bad_version;
} bp_counters;

typedef struct {
    bp_callbacks cb;
    uint32_t boot_id;
    const char *name;
    const char *device_id;  /* unique, stable across reboots (serial number) */
    uint32_t session;       /* active session; 0 = no host yet */
    bp_session *active;     /* its history */
    uint32_t use_counter;
    uint16_t watchdog_ms;
    uint32_t now_ms;
    uint32_t last_hb_ms;
    uint8_t hb_valid;
    uint8_t hb_since_safe;
    uint8_t safe;
    uint32_t applied_count;
    uint8_t rx[BP_MAX_ENCODED];
    size_t rx_len;
    uint8_t rx_discard;
    bp_session sessions[BP_SESSIONS];
    bp_counters counters;
} bp_device;

/* boot_id: random, non-zero, new at every boot. device_id: unique serial
 * reported in HELLO_ACK (at most BP_DEVICE_ID_MAX bytes are sent). */
void bp_init(bp_device *dev, const bp_callbacks *cb, uint32_t boot_id, const char *name,
             const char *device_id);
/* Feed received bytes (any chunking). now_ms: free-running millisecond clock. */
void bp_feed(bp_device *dev, const uint8_t *data, size_t len, uint32_t now_ms);
/* Call at least every few ms: runs the heartbeat watchdog. */
void bp_tick(bp_device *dev, uint32_t now_ms);

uint16_t bp_crc16(const uint8_t *data, size_t len);
size_t bp_cobs_encode(const uint8_t *in, size_t len, uint8_t *out);
/* Returns decoded length, or -1 if malformed or larger than cap. */
int bp_cobs_decode(const uint8_t *in, size_t len, uint8_t *out, size_t cap);

#endif
