/*
 * host_pty.c - runs the protocol core on a POSIX pty (or a given tty path),
 * with a simulated instrument, optional fault injection and an applied-log.
 *
 *   ./bridge_fw [pty|PATH] [--link PATH] [--applied-log FILE] [--corrupt P]
 *               [--drop P] [--duplicate P] [--seed N] [--silent-after N]
 *               [--device-id ID]
 *
 * Prints the path the host should open on stdout. Signals: SIGUSR1 =
 * "unplug" (close the pty, remove --link), SIGUSR2 = "replug" (new pty behind
 * --link), SIGHUP = "reboot" (new boot id, boot-time instrument state, no
 * sessions; same device id and port), SIGTERM/SIGINT = exit.
 *
 * On a PATH (not a pty) a hang-up (POLLHUP, EOF, EIO) closes the line, says so
 * on stderr and reopens the path every 200 ms: no busy loop.
 */
#define _XOPEN_SOURCE 700
#include "bridge_proto.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define ATT_MAX 15u
#define EXP_MIN 1u
#define EXP_MAX 60000000u
#define STEP_MAX 200000L
#define OFFSET_MAX 1000000L
#define TEXT_MAX 64u

typedef struct {
    bp_instrument ins;
    int fd;          /* pty master or tty */
    int slave_fd;    /* kept open so the master never sees EIO */
    const char *link;
    FILE *log;
    double corrupt, drop, duplicate;
    long silent_after;
    unsigned long frames_in;
    uint64_t rng;
} app_t;

static volatile sig_atomic_t g_unplug, g_replug, g_reboot, g_quit;
static void on_signal(int sig)
{
    if (sig == SIGUSR1) g_unplug = 1;
    else if (sig == SIGUSR2) g_replug = 1;
    else if (sig == SIGHUP) g_reboot = 1;
    else g_quit = 1;
}

static uint32_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

static double rnd(app_t *a)
{
    a->rng ^= a->rng << 13; a->rng ^= a->rng >> 7; a->rng ^= a->rng << 17; /* xorshift64 */
    return (double)(a->rng >> 11) / 9007199254740992.0;
}

static int32_t get_i32(const uint8_t *p)
{
    return (int32_t)((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24));
}

/* ---- instrument handlers (same hard limits as firmware_bridge/device.py) ---- */
static uint8_t app_apply(void *user, uint8_t cmd, const uint8_t *a, uint8_t len)
{
    app_t *app = user;
    bp_instrument *s = &app->ins;
    switch (cmd) {
    case BP_CMD_SET_ATTENUATION:
        if (len != 1) return BP_ERR_BAD_ARGS;
        if (a[0] > ATT_MAX) return BP_ERR_OUT_OF_RANGE;
        s->attenuation = a[0];
        return BP_OK;
    case BP_CMD_SET_EXPOSURE: {
        uint32_t us;
        if (len != 4) return BP_ERR_BAD_ARGS;
        us = (uint32_t)get_i32(a);
        if (us < EXP_MIN || us > EXP_MAX) return BP_ERR_OUT_OF_RANGE;
        s->exposure_us = us;
        return BP_OK;
    }
    case BP_CMD_SET_GAIN:
        if (len != 1) return BP_ERR_BAD_ARGS;
        if (a[0] > 3) return BP_ERR_OUT_OF_RANGE;
        s->gain = a[0];
        return BP_OK;
    case BP_CMD_SHUTTER:
        if (len != 1 || a[0] > 1) return BP_ERR_BAD_ARGS;
        s->shutter_open = a[0];
        return BP_OK;
    case BP_CMD_RECENTRE_BEAM: {
        /* 64-bit arithmetic: no overflow even where long is 32 bits */
        int64_t dx, dy, nx, ny;
        if (len != 8) return BP_ERR_BAD_ARGS;
        dx = get_i32(a); dy = get_i32(a + 4);
        if (dx > STEP_MAX || dx < -STEP_MAX || dy > STEP_MAX || dy < -STEP_MAX)
            return BP_ERR_OUT_OF_RANGE;
        nx = (int64_t)s->beam_x_nm + dx; ny = (int64_t)s->beam_y_nm + dy;
        if (nx > OFFSET_MAX || nx < -OFFSET_MAX || ny > OFFSET_MAX || ny < -OFFSET_MAX)
            return BP_ERR_OUT_OF_RANGE;
        s->beam_x_nm = (int32_t)nx; s->beam_y_nm = (int32_t)ny;
        return BP_OK;
    }
    case BP_CMD_RAISE_ALARM:
        if (len < 3 || (unsigned)a[2] != (unsigned)(len - 3)) return BP_ERR_BAD_ARGS;
        if (a[2] > TEXT_MAX) return BP_ERR_OUT_OF_RANGE;
        s->alarm_code = (uint16_t)(a[0] | (a[1] << 8));
        return BP_OK;
    default:
        return BP_ERR_UNKNOWN_COMMAND;
    }
}

static void app_safe(void *user)
{
    app_t *app = user;
    app->ins.shutter_open = 0;
    app->ins.attenuation = ATT_MAX;
    app->ins.alarm_code = BP_WATCHDOG_ALARM;
}

static void app_resume(void *user) { ((app_t *)user)->ins.alarm_code = 0; }

static void app_state(void *user, bp_instrument *out) { *out = ((app_t *)user)->ins; }

/* One UTF-8 sequence at t (n > 0 bytes left): returns the bytes it spans and
 * sets *ok. An invalid sequence spans its "maximal subpart" (Unicode 15,
 * section 3.9), so each becomes one U+FFFD exactly as Python's "replace". */
static unsigned utf8_step(const uint8_t *t, unsigned n, int *ok)
{
    unsigned len, i;
    uint8_t lo = 0x80u, hi = 0xBFu;
    *ok = 0;
    if (t[0] < 0x80u) { *ok = 1; return 1; }
    if (t[0] >= 0xC2u && t[0] <= 0xDFu) len = 2;
    else if (t[0] >= 0xE0u && t[0] <= 0xEFu) len = 3;
    else if (t[0] >= 0xF0u && t[0] <= 0xF4u) len = 4;
    else return 1;
    if (t[0] == 0xE0u) lo = 0xA0u;        /* no overlongs */
    else if (t[0] == 0xEDu) hi = 0x9Fu;   /* no surrogates */
    else if (t[0] == 0xF0u) lo = 0x90u;   /* no overlongs */
    else if (t[0] == 0xF4u) hi = 0x8Fu;   /* <= U+10FFFF */
    for (i = 1; i < len; i++) {
        if (i >= n || t[i] < lo || t[i] > hi) return i;
        lo = 0x80u; hi = 0xBFu;
    }
    *ok = 1;
    return len;
}

/* JSON string; invalid UTF-8 becomes U+FFFD, control characters are escaped. */
static void json_text(FILE *f, const uint8_t *t, unsigned n)
{
    unsigned i = 0;
    fputc('"', f);
    while (i < n) {
        int ok;
        unsigned k = utf8_step(t + i, n - i, &ok);
        if (!ok) fputs("\\ufffd", f);
        else if (k > 1) fwrite(t + i, 1, k, f);
        else if (t[i] == '"' || t[i] == '\\') fprintf(f, "\\%c", t[i]);
        else if (t[i] < 0x20u || t[i] == 0x7Fu) fprintf(f, "\\u%04x", t[i]);
        else fputc(t[i], f);
        i += k;
    }
    fputc('"', f);
}

static void app_applied(void *user, uint32_t session, uint32_t seq, uint8_t cmd,
                        const uint8_t *a, uint8_t len)
{
    static const char *names[] = {"?", "set_attenuation", "set_exposure", "set_gain", "shutter",
                                  "recentre_beam", "raise_alarm", "query_state", "resume"};
    app_t *app = user;
    FILE *f = app->log;
    struct timespec ts;
    if (!f) return;
    clock_gettime(CLOCK_REALTIME, &ts);
    fprintf(f, "{\"session\": %lu, \"seq\": %lu, \"command\": \"%s\", \"args\": {",
            (unsigned long)session, (unsigned long)seq, cmd <= 8 ? names[cmd] : "?");
    switch (cmd) {
    case BP_CMD_SET_ATTENUATION: fprintf(f, "\"level\": %u", a[0]); break;
    case BP_CMD_SET_EXPOSURE: fprintf(f, "\"exposure_us\": %lu", (unsigned long)(uint32_t)get_i32(a)); break;
    case BP_CMD_SET_GAIN: fprintf(f, "\"mode\": %u", a[0]); break;
    case BP_CMD_SHUTTER: fprintf(f, "\"open\": %u", a[0]); break;
    case BP_CMD_RECENTRE_BEAM:
        fprintf(f, "\"dx_nm\": %ld, \"dy_nm\": %ld", (long)get_i32(a), (long)get_i32(a + 4)); break;
    case BP_CMD_RAISE_ALARM:
        fprintf(f, "\"code\": %u, \"text\": ", (unsigned)(a[0] | (a[1] << 8)));
        json_text(f, a + 3, a[2]);
        break;
    default: break;
    }
    (void)len;
    fprintf(f, "}, \"time\": %ld.%06ld}\n", (long)ts.tv_sec, (long)(ts.tv_nsec / 1000));
    fflush(f);
}

static void write_all(int fd, const uint8_t *d, size_t n)
{
    uint32_t give_up = now_ms() + 1000u;
    while (n && fd >= 0) {
        ssize_t w = write(fd, d, n);
        if (w > 0) { d += w; n -= (size_t)w; continue; }
        if (w < 0 && (errno == EAGAIN || errno == EINTR) && (int32_t)(give_up - now_ms()) > 0) {
            struct pollfd p; p.fd = fd; p.events = POLLOUT; poll(&p, 1, 10);
            continue;
        }
        return; /* host gone: bytes are lost, as on a wire */
    }
}

static void flip_bit(app_t *a, uint8_t *d, size_t n)
{
    size_t i = (size_t)(rnd(a) * (double)n);
    if (i >= n) i = n - 1;
    d[i] ^= (uint8_t)(1u << (unsigned)(rnd(a) * 8.0));
}

static void app_write(void *user, const uint8_t *data, size_t len)
{
    app_t *a = user;
    uint8_t buf[BP_MAX_ENCODED + 1];
    if (a->silent_after >= 0 && a->frames_in > (unsigned long)a->silent_after) return;
    if (a->drop > 0 && rnd(a) < a->drop) return;
    if (len > sizeof buf) return;
    memcpy(buf, data, len);
    if (a->corrupt > 0 && rnd(a) < a->corrupt) flip_bit(a, buf, len - 1);
    write_all(a->fd, buf, len);
    if (a->duplicate > 0 && rnd(a) < a->duplicate) write_all(a->fd, buf, len);
}

static void set_raw(int fd)
{
    struct termios t;
    if (tcgetattr(fd, &t) != 0) return;
    t.c_iflag &= ~(tcflag_t)(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
    t.c_oflag &= ~(tcflag_t)OPOST;
    t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
    t.c_cflag &= ~(tcflag_t)(CSIZE | PARENB);
    t.c_cflag |= CS8;
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    tcsetattr(fd, TCSANOW, &t);
}

static int plug(app_t *a, char *path, size_t cap)
{
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    const char *name;
    if (m < 0 || grantpt(m) != 0 || unlockpt(m) != 0 || (name = ptsname(m)) == NULL) return -1;
    snprintf(path, cap, "%s", name);
    a->slave_fd = open(path, O_RDWR | O_NOCTTY);
    if (a->slave_fd < 0) return -1;
    set_raw(a->slave_fd);
    set_raw(m);
    fcntl(m, F_SETFL, fcntl(m, F_GETFL) | O_NONBLOCK);
    a->fd = m;
    if (a->link) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.%ld.tmp", a->link, (long)getpid());
        unlink(tmp);
        if (symlink(path, tmp) != 0 || rename(tmp, a->link) != 0) return -1; /* atomic re-point */
    }
    return 0;
}

static void unplug(app_t *a)
{
    if (a->link) unlink(a->link);
    if (a->fd >= 0) close(a->fd);
    if (a->slave_fd >= 0) close(a->slave_fd);
    a->fd = a->slave_fd = -1;
}

/* (Re)boot: boot-time instrument state, fresh protocol core, new random boot id
 * (from the clock, not the fault RNG, so --seed runs stay reproducible). */
static void boot(app_t *app, bp_device *dev, const bp_callbacks *cb, const char *device_id)
{
    static uint32_t boots;
    struct timespec ts;
    uint64_t x;
    memset(&app->ins, 0, sizeof app->ins);
    app->ins.attenuation = ATT_MAX; /* boot state = safe values, see README */
    app->ins.exposure_us = 100000u;
    clock_gettime(CLOCK_REALTIME, &ts);
    x = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 40) ^ ++boots;
    x *= 0x9E3779B97F4A7C15ull;
    x ^= x >> 29;
    bp_init(dev, cb, (uint32_t)(x >> 32) ? (uint32_t)(x >> 32) : 1u, "c-firmware", device_id);
}

static int open_path(app_t *a, const char *port)
{
    a->fd = open(port, O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (a->fd < 0) return -1;
    set_raw(a->fd);
    return 0;
}

int main(int argc, char **argv)
{
    static app_t app;
    static bp_device dev;
    static char default_id[BP_DEVICE_ID_MAX + 1];
    bp_callbacks cb;
    const char *port = "pty", *device_id = NULL;
    char path[256];
    int i, is_pty;
    uint32_t next_reopen = 0;
    struct sigaction sa;
    uint8_t rx[4096], frame[BP_MAX_ENCODED + 2];
    size_t flen = 0;
    int discard = 0;

    memset(&app, 0, sizeof app);
    app.fd = app.slave_fd = -1;
    app.silent_after = -1;
    app.rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    for (i = 1; i < argc; i++) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (o[0] != '-') { port = o; continue; }
        if (!v) { fprintf(stderr, "missing value for %s\n", o); return 2; }
        i++;
        if (!strcmp(o, "--link")) app.link = v;
        else if (!strcmp(o, "--applied-log")) {
            app.log = fopen(v, "a");
            if (!app.log) { perror(v); return 2; }
        } else if (!strcmp(o, "--corrupt")) app.corrupt = atof(v);
        else if (!strcmp(o, "--drop")) app.drop = atof(v);
        else if (!strcmp(o, "--duplicate")) app.duplicate = atof(v);
        else if (!strcmp(o, "--seed")) app.rng = (uint64_t)strtoull(v, NULL, 10) * 2654435761u + 1u;
        else if (!strcmp(o, "--silent-after")) app.silent_after = atol(v);
        else if (!strcmp(o, "--device-id")) {
            if (!*v || strlen(v) > BP_DEVICE_ID_MAX) {
                fprintf(stderr, "--device-id must be 1 to %u bytes\n", BP_DEVICE_ID_MAX);
                return 2;
            }
            device_id = v;
        }
        else { fprintf(stderr, "unknown option %s\n", o); return 2; }
    }
    if (!device_id) { /* a new process is a new device unless told otherwise */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        snprintf(default_id, sizeof default_id, "fw-%08lx",
                 (unsigned long)(((uint32_t)ts.tv_nsec * 2654435761u) ^ (uint32_t)getpid()
                                 ^ ((uint32_t)ts.tv_sec << 20)));
        device_id = default_id;
    }

    cb.apply = app_apply; cb.applied = app_applied; cb.enter_safe_state = app_safe;
    cb.resume = app_resume; cb.get_state = app_state; cb.write = app_write; cb.user = &app;
    boot(&app, &dev, &cb, device_id);

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL); sigaction(SIGUSR2, &sa, NULL); sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL); sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    is_pty = !strcmp(port, "pty");
    if (is_pty) {
        if (plug(&app, path, sizeof path) != 0) { perror("pty"); return 1; }
    } else {
        if (open_path(&app, port) != 0) { perror(port); return 1; }
        snprintf(path, sizeof path, "%s", port);
    }
    printf("%s\n", app.link ? app.link : path);
    fflush(stdout);

    while (!g_quit) {
        struct pollfd p;
        int r;
        if (g_unplug) { g_unplug = 0; if (is_pty) unplug(&app); }
        if (g_replug) {
            g_replug = 0;
            if (is_pty && app.fd < 0 && plug(&app, path, sizeof path) != 0) { perror("replug"); return 1; }
            flen = 0; discard = 0;
        }
        if (g_reboot) {
            g_reboot = 0;
            boot(&app, &dev, &cb, device_id);
            flen = 0; discard = 0;
        }
        if (!is_pty && app.fd < 0 && (int32_t)(now_ms() - next_reopen) >= 0) {
            next_reopen = now_ms() + 200u;
            if (open_path(&app, port) == 0) {
                fprintf(stderr, "bridge_fw: %s reopened\n", port);
                flen = 0; discard = 0;
            }
        }
        p.fd = app.fd; p.events = POLLIN; p.revents = 0;
        r = poll(&p, app.fd >= 0 ? 1 : 0, 5);
        if (r > 0 && app.fd >= 0 && (p.revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) {
            ssize_t n = read(app.fd, rx, sizeof rx);
            ssize_t k;
            if (n < 0 && (errno == EAGAIN || errno == EINTR)) n = 0;
            else if (n <= 0) {
                /* EOF / EIO / hang-up: without this the poll above returns at once
                 * forever (100 % CPU). A pty we own never hangs up (we hold the slave). */
                if (!is_pty) {
                    fprintf(stderr, "bridge_fw: %s hung up (%s); reopening every 200 ms\n", port,
                            n == 0 ? "end of file" : strerror(errno));
                    close(app.fd);
                    app.fd = -1;
                    next_reopen = now_ms() + 200u;
                } else {
                    struct timespec ts = {0, 5000000L};
                    nanosleep(&ts, NULL);
                }
                n = 0;
            }
            for (k = 0; k < n; k++) {
                /* Split frames here only to inject faults per frame; the core
                 * itself accepts any chunking. */
                if (rx[k] != 0) {
                    if (flen < sizeof frame - 1) frame[flen++] = rx[k];
                    else discard = 1;
                    continue;
                }
                if (flen && !discard) {
                    int copies = 1;
                    app.frames_in++;
                    if (app.drop > 0 && rnd(&app) < app.drop) copies = 0;
                    else {
                        if (app.corrupt > 0 && rnd(&app) < app.corrupt) flip_bit(&app, frame, flen);
                        if (app.duplicate > 0 && rnd(&app) < app.duplicate) copies = 2;
                    }
                    frame[flen] = 0;
                    while (copies-- > 0 && !(app.silent_after >= 0 && app.frames_in > (unsigned long)app.silent_after))
                        bp_feed(&dev, frame, flen + 1, now_ms());
                }
                flen = 0; discard = 0;
            }
        }
        bp_tick(&dev, now_ms());
    }
    unplug(&app);
    if (app.log) fclose(app.log);
    return 0;
}
