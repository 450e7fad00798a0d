// shootcost: one trial of `lufreplay calibrate` (what a remote TLB shootdown costs on this host).
//
// Compiled at run time by lufreplay/capture/shootdown_cost.py (gcc -O2 -pthread). Python runs the trials,
// reads /proc/interrupts around them and does the statistics; this program only times system calls and
// spins, without the GIL.
//
//   shootcost MODE OPS SENDER_CPU RECV_CPU...
//
// The sender (pinned to SENDER_CPU) writes one private anonymous page and zaps it with
// madvise(MADV_DONTNEED), OPS times, timing each madvise. One spinning receiver thread is pinned to each
// RECV_CPU:
//   same   the receivers are threads of this process: each zap flushes the mm on their CPUs (one TLB IPI
//          to every receiver CPU) and the sender waits for them;
//   other  the receivers are threads of a forked child (another mm): the same CPUs are busy, no IPI.
// A receiver reads CLOCK_MONOTONIC in a loop and logs every gap between two reads of GAP_LO_NS..GAP_HI_NS:
// time the loop lost to an interrupt (longer gaps are preemptions by other tasks, not interrupts). Python
// matches the gaps to the zaps they overlap: the sender waits until every receiver has run the flush.
//
// Output: one line of JSON on stdout (times in ns, CLOCK_MONOTONIC):
//   {"send_t0": [zap starts], "send_ns": [zap latencies],
//    "recv": [{"cpu": C, "window_ns": W, "min_ns": M, "gap_t": [gap starts], "gap_ns": [gap lengths]}, ...]}
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_RECV 256
#define GAP_LO_NS 300
#define GAP_HI_NS 200000
#define MAX_GAPS (1 << 18)

struct recv_out {
    int64_t window_ns, gaps, min_ns;
    int64_t gap_t[MAX_GAPS], gap_ns[MAX_GAPS];
};

struct ctl {
    atomic_int ready;
    atomic_int go;
    atomic_int stop;
};

static struct recv_out *OUT;  // one per receiver, shared with a forked child

static struct ctl *C;
static int recv_cpu[MAX_RECV];

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// Pinned, and SCHED_FIFO when allowed: on a busy host a normal-priority spinner shares its CPU with other
// tasks, and a flush sends no IPI to a CPU that is running another mm at that instant. A trial lasts well
// under a second, which the kernel's RT throttling (95 % of each second) allows.
static int pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    struct sched_param sp = {.sched_priority = 1};
    pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);  // best effort: not root, or RT disabled
    return pthread_setaffinity_np(pthread_self(), sizeof(s), &s);
}

static void *spin(void *arg)
{
    int k = (int)(intptr_t)arg;
    if (pin(recv_cpu[k]) != 0) {
        fprintf(stderr, "shootcost: cannot pin a receiver to CPU %d\n", recv_cpu[k]);
        exit(3);
    }
    atomic_fetch_add(&C->ready, 1);
    while (!atomic_load_explicit(&C->go, memory_order_acquire))
        ;
    struct recv_out *o = &OUT[k];
    int64_t t0 = now_ns(), prev = t0, gaps = 0, dmin = INT64_MAX;
    while (!atomic_load_explicit(&C->stop, memory_order_relaxed)) {
        int64_t t = now_ns(), d = t - prev;
        if (d < dmin)
            dmin = d;
        if (d >= GAP_LO_NS && d <= GAP_HI_NS && gaps < MAX_GAPS) {
            o->gap_t[gaps] = prev;
            o->gap_ns[gaps] = d;
            gaps++;
        }
        prev = t;
    }
    o->window_ns = prev - t0;
    o->gaps = gaps;
    o->min_ns = dmin == INT64_MAX ? 0 : dmin;
    return NULL;
}

static void print_array(const int64_t *a, long n)
{
    putchar('[');
    for (long i = 0; i < n; i++)
        printf(i ? ",%lld" : "%lld", (long long)a[i]);
    putchar(']');
}

static void start_receivers(int n, pthread_t *th)
{
    for (int k = 0; k < n; k++)
        if (pthread_create(&th[k], NULL, spin, (void *)(intptr_t)k) != 0) {
            fprintf(stderr, "shootcost: pthread_create failed\n");
            exit(3);
        }
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: shootcost same|other OPS SENDER_CPU RECV_CPU...\n");
        return 2;
    }
    int same = strcmp(argv[1], "same") == 0;
    if (!same && strcmp(argv[1], "other") != 0) {
        fprintf(stderr, "shootcost: MODE must be same or other\n");
        return 2;
    }
    long ops = strtol(argv[2], NULL, 10);
    int sender = atoi(argv[3]);
    int n = argc - 4;
    if (ops <= 0 || n > MAX_RECV) {
        fprintf(stderr, "shootcost: bad OPS or too many receivers\n");
        return 2;
    }
    for (int k = 0; k < n; k++)
        recv_cpu[k] = atoi(argv[4 + k]);
    C = mmap(NULL, sizeof(*C), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    OUT = mmap(NULL, sizeof(*OUT) * (size_t)n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int64_t *lat = calloc((size_t)ops, sizeof(int64_t)), *start = calloc((size_t)ops, sizeof(int64_t));
    if (C == MAP_FAILED || OUT == MAP_FAILED || !lat || !start) {
        perror("shootcost: memory");
        return 3;
    }
    pthread_t th[MAX_RECV];
    pid_t child = -1;
    if (same) {
        start_receivers(n, th);
    } else {
        child = fork();
        if (child < 0) {
            perror("shootcost: fork");
            return 3;
        }
        if (child == 0) {
            start_receivers(n, th);
            for (int k = 0; k < n; k++)
                pthread_join(th[k], NULL);
            _exit(0);
        }
    }
    if (pin(sender) != 0) {
        fprintf(stderr, "shootcost: cannot pin the sender to CPU %d\n", sender);
        return 3;
    }
    while (atomic_load(&C->ready) < n)
        sched_yield();
    volatile char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("shootcost: mmap");
        return 3;
    }
    atomic_store_explicit(&C->go, 1, memory_order_release);
    usleep(2000);  // let every receiver reach its loop (and, in `same`, load this mm)
    for (long i = 0; i < ops; i++) {
        p[0] = (char)i;  // fault the page in: the zap below has a present PTE to clear and flush
        int64_t t0 = now_ns();
        if (madvise((void *)p, 4096, MADV_DONTNEED) != 0) {
            perror("shootcost: madvise");
            return 3;
        }
        start[i] = t0;
        lat[i] = now_ns() - t0;
    }
    atomic_store(&C->stop, 1);
    if (same)
        for (int k = 0; k < n; k++)
            pthread_join(th[k], NULL);
    else
        waitpid(child, NULL, 0);
    printf("{\"send_t0\": ");
    print_array(start, ops);
    printf(", \"send_ns\": ");
    print_array(lat, ops);
    printf(", \"recv\": [");
    for (int k = 0; k < n; k++) {
        struct recv_out *o = &OUT[k];
        printf("%s{\"cpu\": %d, \"window_ns\": %lld, \"min_ns\": %lld, \"gap_t\": ", k ? ", " : "", recv_cpu[k],
               (long long)o->window_ns, (long long)o->min_ns);
        print_array(o->gap_t, o->gaps);
        printf(", \"gap_ns\": ");
        print_array(o->gap_ns, o->gaps);
        printf("}");
    }
    printf("]}\n");
    return 0;
}
