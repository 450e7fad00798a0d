// lrwork: the memory-touching part of lufreplay's built-in workloads.
//
// Compiled at run time by lufreplay/workloads/helper.py (gcc -O2 -pthread). Python owns files,
// cgroups, process trees and reporting; this program only touches memory fast, without the GIL.
//
// Protocol: every mode first reads one line from stdin (the "gate": the parent moves the process into
// its memory cgroup before any memory is charged), prints progress on stderr, and prints ONE line of
// JSON on stdout at the end. Modes that wait for an external event (compaction) print a JSON "ready"
// line first and then block on stdin until the parent writes another line or closes it.
//
//   lrwork stream FILE SECONDS THREADS CPU0 WRITE LABEL [ADVICE]  stream a MAP_SHARED mapping, 1 word/page
//   lrwork churn FILE SECONDS ANON_BYTES CHUNK_BYTES CPU0   dirty a shared file mapping + anon churn
//   lrwork cowfork BYTES FRAG_BYTES CHILDREN               COW-shared anon region read on all CPUs
//   lrwork writer FILE SECONDS RATE                         write() and mmap writes into a shared file
//   lrwork regions FILE_RO FILE_RW REGION_BYTES FRAG_BYTES  mappings with known permissions, idle
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAXT 256

static atomic_ulong touched[MAXT];
static atomic_int stop_flag;
static volatile uint64_t sink;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(int who) {
  struct rusage ru;
  getrusage(who, &ru);
  return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
  fprintf(stderr, "lrwork: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void gate(void) {
  char buf[64];
  if (!fgets(buf, sizeof buf, stdin)) exit(0);  // parent gone before the start: nothing to do
}

static void pin(int cpu) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu % n, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static unsigned long total_touched(int n) {
  unsigned long t = 0;
  for (int i = 0; i < n; i++) t += atomic_load(&touched[i]);
  return t;
}

// Wait SECONDS, printing the page rate every second; then raise stop_flag.
static void run_clock(double secs, int nthreads, const char *label) {
  double t0 = now(), tl = t0;
  unsigned long last = 0;
  while (now() - t0 < secs) {
    double left = secs - (now() - t0);
    usleep((useconds_t)((left < 1.0 ? left : 1.0) * 1e6));
    unsigned long tot = total_touched(nthreads);
    double t = now();
    if (t - tl > 0.2)
      fprintf(stderr, "[%s] t=%.1fs %.0f pages/s\n", label, t - t0, (tot - last) / (t - tl));
    last = tot;
    tl = t;
  }
  atomic_store(&stop_flag, 1);
}

// ---- stream -------------------------------------------------------------------------------------

struct stream_arg {
  volatile uint8_t *base;
  size_t npages;
  int id, nthreads, cpu, write;
};

static void *stream_worker(void *p) {
  struct stream_arg *a = p;
  pin(a->cpu);
  size_t start = a->npages / a->nthreads * a->id;
  unsigned long local = 0;
  uint64_t sum = 0;
  while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
    for (size_t i = 0; i < a->npages; i++) {
      size_t pg = (start + i) % a->npages;
      volatile uint64_t *w = (volatile uint64_t *)(a->base + pg * PAGE);
      if (a->write)
        *w = *w + 1;
      else
        sum += *w;
      if ((++local & 255) == 0) {
        atomic_fetch_add_explicit(&touched[a->id], 256, memory_order_relaxed);
        if (atomic_load_explicit(&stop_flag, memory_order_relaxed)) break;
      }
    }
  }
  atomic_fetch_add_explicit(&touched[a->id], local & 255, memory_order_relaxed);
  sink += sum;
  return NULL;
}

static int mode_stream(int argc, char **argv) {
  if (argc < 8) return 2;
  const char *file = argv[2];
  double secs = atof(argv[3]);
  int nthreads = atoi(argv[4]), cpu0 = atoi(argv[5]), wr = atoi(argv[6]);
  const char *label = argv[7];
  if (nthreads < 1 || nthreads > MAXT) return 2;
  gate();
  int fd = open(file, wr ? O_RDWR : O_RDONLY);
  if (fd < 0) die(file);
  struct stat st;
  if (fstat(fd, &st)) die("fstat");
  size_t len = st.st_size & ~(PAGE - 1);
  if (len == 0) { fprintf(stderr, "lrwork: %s is empty\n", file); return 1; }
  int prot = PROT_READ | (wr ? PROT_WRITE : 0);
  uint8_t *base = mmap(NULL, len, prot, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) die("mmap");
  // madvise() advice number (MADV_RANDOM: no readahead, so order-0 folios; MADV_NOHUGEPAGE: no PMD maps)
  if (argc > 8 && atoi(argv[8]) >= 0 && madvise(base, len, atoi(argv[8]))) die("madvise");
  struct stream_arg args[MAXT];
  pthread_t th[MAXT];
  double t0 = now();
  for (int i = 0; i < nthreads; i++) {
    args[i] = (struct stream_arg){base, len / PAGE, i, nthreads, cpu0 + i, wr};
    pthread_create(&th[i], NULL, stream_worker, &args[i]);
  }
  run_clock(secs, nthreads, label);
  for (int i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
  double el = now() - t0;
  printf("{\"pid\": %d, \"pages\": %lu, \"runtime_s\": %.6f, \"cpu_s\": %.6f, \"threads\": %d, "
         "\"map_start\": %lu, \"map_end\": %lu}\n",
         getpid(), total_touched(nthreads), el, cpu_seconds(RUSAGE_SELF), nthreads, (unsigned long)base,
         (unsigned long)base + len);
  return 0;
}

// ---- churn: dirty a shared file mapping while anonymous chunks are mapped, written, unmapped ------

struct churn_arg {
  uint8_t *fbase;
  size_t flen, anon_bytes, chunk;
  int fd, cpu, id;
  unsigned long *nmaps;
};

static void *churn_file(void *p) {
  struct churn_arg *a = p;
  pin(a->cpu);
  const size_t kick = 16UL << 20;  // start writeback every 16 MiB so dirty pages stay bounded
  while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
    for (size_t off = 0; off < a->flen && !atomic_load(&stop_flag); off += kick) {
      size_t end = off + kick < a->flen ? off + kick : a->flen;
      for (size_t o = off; o < end; o += PAGE) (*(volatile uint64_t *)(a->fbase + o))++;
      atomic_fetch_add(&touched[a->id], (end - off) / PAGE);
      sync_file_range(a->fd, off, end - off, SYNC_FILE_RANGE_WRITE);
    }
  }
  return NULL;
}

static void *churn_anon(void *p) {
  struct churn_arg *a = p;
  pin(a->cpu);
  size_t nslots = a->anon_bytes / a->chunk;
  if (nslots < 1) nslots = 1;
  uint8_t **slot = calloc(nslots, sizeof *slot);
  size_t i = 0;
  while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
    size_t s = i++ % nslots;
    if (slot[s]) munmap(slot[s], a->chunk);
    slot[s] = mmap(NULL, a->chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (slot[s] == MAP_FAILED) die("mmap anon");
    madvise(slot[s], a->chunk, MADV_NOHUGEPAGE);  // order-0 anon folios: the common case
    for (size_t o = 0; o < a->chunk; o += PAGE) slot[s][o] = (uint8_t)(o >> 12) | 1;
    atomic_fetch_add(&touched[a->id], a->chunk / PAGE);
    (*a->nmaps)++;
  }
  for (size_t s = 0; s < nslots; s++)
    if (slot[s]) munmap(slot[s], a->chunk);
  free(slot);
  return NULL;
}

static int mode_churn(int argc, char **argv) {
  if (argc < 7) return 2;
  const char *file = argv[2];
  double secs = atof(argv[3]);
  size_t anon = strtoull(argv[4], 0, 0), chunk = strtoull(argv[5], 0, 0);
  int cpu0 = atoi(argv[6]);
  gate();
  int fd = open(file, O_RDWR);
  if (fd < 0) die(file);
  struct stat st;
  if (fstat(fd, &st)) die("fstat");
  size_t flen = st.st_size & ~(PAGE - 1);
  uint8_t *fbase = mmap(NULL, flen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (fbase == MAP_FAILED) die("mmap file");
  unsigned long nmaps = 0;
  struct churn_arg fa = {fbase, flen, anon, chunk, fd, cpu0, 0, &nmaps};
  struct churn_arg aa = {fbase, flen, anon, chunk, fd, cpu0 + 1, 1, &nmaps};
  pthread_t t1, t2;
  double t0 = now();
  pthread_create(&t1, NULL, churn_file, &fa);
  pthread_create(&t2, NULL, churn_anon, &aa);
  run_clock(secs, 2, "anon-churn");
  pthread_join(t1, NULL);
  pthread_join(t2, NULL);
  double el = now() - t0;
  printf("{\"pid\": %d, \"pages\": %lu, \"file_pages_written\": %lu, \"anon_pages_written\": %lu, "
         "\"anon_maps\": %lu, \"runtime_s\": %.6f, \"cpu_s\": %.6f, \"threads\": 2}\n",
         getpid(), total_touched(2), atomic_load(&touched[0]), atomic_load(&touched[1]), nmaps, el,
         cpu_seconds(RUSAGE_SELF));
  return 0;
}

// ---- helpers for the modes that wait for compaction -----------------------------------------------

static uint8_t *map_anon(size_t len) {
  uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) die("mmap anon");
  madvise(p, len, MADV_NOHUGEPAGE);  // THPs are not LUF-eligible; keep the folios order-0
  return p;
}

static unsigned long touch_read(const uint8_t *p, size_t len) {
  uint64_t s = 0;
  for (size_t i = 0; i < len; i += PAGE) s += *(const volatile uint8_t *)(p + i);
  sink += s;
  return len / PAGE;
}

// Fragmentation: FRAG bytes of filler pages are allocated interleaved with the pages of the regions
// under test, then all freed. Every pageblock the regions live in is then partly free, so compaction
// migrates region pages from the blocks below its scanners' meeting point into holes above it.
struct filler {
  uint8_t *p;
  size_t len, next, per_page;  // filler pages to touch after each region page
};

static struct filler filler_new(size_t frag, size_t region_pages) {
  struct filler f = {NULL, frag, 0, 0};
  if (frag && region_pages) {
    f.p = map_anon(frag);
    f.per_page = frag / PAGE / region_pages;
  }
  return f;
}

static void filler_step(struct filler *f) {
  for (size_t i = 0; i < f->per_page && f->next < f->len; i++, f->next += PAGE) f->p[f->next] = 1;
}

static void filler_free(struct filler *f) {
  if (f->p) munmap(f->p, f->len);
  f->p = NULL;
}

static void wait_line(void) {
  char buf[64];
  (void)!fgets(buf, sizeof buf, stdin);
}

// ---- cowfork ------------------------------------------------------------------------------------

static int mode_cowfork(int argc, char **argv) {
  if (argc < 5) return 2;
  size_t len = strtoull(argv[2], 0, 0) & ~(PAGE - 1), frag = strtoull(argv[3], 0, 0) & ~(PAGE - 1);
  int nchildren = atoi(argv[4]);
  if (nchildren < 1 || nchildren > 64) return 2;
  gate();
  double t0 = now();
  uint8_t *p = map_anon(len);
  struct filler fl = filler_new(frag, len / PAGE);
  for (size_t i = 0; i < len; i += PAGE) {
    p[i] = (uint8_t)(i >> 12) | 1;
    filler_step(&fl);
  }
  filler_free(&fl);
  pid_t kids[64];
  int pipes[64][2];
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  for (int k = 0; k < nchildren; k++) {
    if (pipe(pipes[k])) die("pipe");
    kids[k] = fork();
    if (kids[k] < 0) die("fork");
    if (kids[k] == 0) {
      // The child reads the COW-shared region on its own CPU until its parent says stop, so the
      // pages sit in TLBs on several CPUs when compaction unmaps them.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      close(pipes[k][1]);
      fcntl(pipes[k][0], F_SETFL, O_NONBLOCK);
      pin(k + 1);
      char c;
      while (read(pipes[k][0], &c, 1) < 0 && errno == EAGAIN) {
        touch_read(p, len);
        usleep(20000);
      }
      _exit(0);
    }
    close(pipes[k][0]);
  }
  pin(0);
  printf("{\"ready\": true, \"pid\": %d, \"region_start\": %lu, \"region_end\": %lu, \"children\": [",
         getpid(), (unsigned long)p, (unsigned long)p + len);
  for (int k = 0; k < nchildren; k++) printf("%s%d", k ? ", " : "", kids[k]);
  printf("]}\n");
  fflush(stdout);
  // Read the region too until the parent writes the stop line.
  unsigned long n = len / PAGE;  // the initial write
  fcntl(0, F_SETFL, O_NONBLOCK);
  char buf[64];
  for (;;) {
    ssize_t r = read(0, buf, sizeof buf);
    if (r >= 0 || errno != EAGAIN) break;
    n += touch_read(p, len);
    usleep(20000);
  }
  for (int k = 0; k < nchildren; k++) {
    close(pipes[k][1]);
    waitpid(kids[k], NULL, 0);
  }
  double el = now() - t0;
  printf("{\"pid\": %d, \"pages\": %lu, \"runtime_s\": %.6f, \"cpu_s\": %.6f, \"processes\": %d, \"ncpu\": %ld}\n",
         getpid(), n, el, cpu_seconds(RUSAGE_SELF) + cpu_seconds(RUSAGE_CHILDREN), nchildren + 1, ncpu);
  return 0;
}

// ---- writer (mixed-file) ------------------------------------------------------------------------

static int mode_writer(int argc, char **argv) {
  if (argc < 5) return 2;
  const char *file = argv[2];
  double secs = atof(argv[3]);
  double rate = atof(argv[4]);  // writes per second through each path
  gate();
  int fd = open(file, O_RDWR);
  if (fd < 0) die(file);
  struct stat st;
  if (fstat(fd, &st)) die("fstat");
  size_t len = st.st_size & ~(PAGE - 1), npages = len / PAGE;
  uint8_t *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) die("mmap");
  pin(1);
  unsigned long nmm = 0, nwr = 0, x = 88172645463325252ULL ^ (unsigned long)getpid();
  double t0 = now(), next = t0, period = rate > 0 ? 1.0 / rate : 1.0;
  uint64_t word = 0;
  while (now() - t0 < secs) {
    // xorshift: scattered pages, so writes land on pages the reader has (or had) mapped
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    size_t a = x % npages, b = (x >> 20) % npages;
    *(volatile uint64_t *)(base + a * PAGE + 8) = ++word;  // through the shared RW mapping
    nmm++;
    if (pwrite(fd, &word, sizeof word, b * PAGE + 16) == sizeof word) nwr++;  // through write()
    next += period;
    double d = next - now();
    if (d > 0) usleep((useconds_t)(d * 1e6));
  }
  double el = now() - t0;
  printf("{\"pid\": %d, \"pages\": %lu, \"mmap_writes\": %lu, \"pwrites\": %lu, \"runtime_s\": %.6f, "
         "\"cpu_s\": %.6f, \"map_start\": %lu, \"map_end\": %lu}\n",
         getpid(), nmm + nwr, nmm, nwr, el, cpu_seconds(RUSAGE_SELF), (unsigned long)base,
         (unsigned long)base + len);
  return 0;
}

// ---- regions (compact) --------------------------------------------------------------------------

static int mode_regions(int argc, char **argv) {
  if (argc < 6) return 2;
  size_t len = strtoull(argv[4], 0, 0) & ~(PAGE - 1), frag = strtoull(argv[5], 0, 0) & ~(PAGE - 1);
  gate();
  double t0 = now();
  int fro = open(argv[2], O_RDONLY), frw = open(argv[3], O_RDWR);
  if (fro < 0 || frw < 0) die("open");
  uint8_t *anon_rw = map_anon(len), *anon_ro = map_anon(len), *anon_cow = map_anon(len);
  uint8_t *file_ro = mmap(0, len, PROT_READ, MAP_SHARED, fro, 0);
  uint8_t *file_rwd = mmap(0, len, PROT_READ | PROT_WRITE, MAP_SHARED, frw, 0);
  uint8_t *file_rwc = mmap(0, len, PROT_READ | PROT_WRITE, MAP_SHARED, frw, len);
  uint8_t *file_priv = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fro, len);
  if (file_ro == MAP_FAILED || file_rwd == MAP_FAILED || file_rwc == MAP_FAILED || file_priv == MAP_FAILED)
    die("mmap file");
  uint8_t *files[] = {file_ro, file_rwd, file_rwc, file_priv};
  for (int i = 0; i < 4; i++) madvise(files[i], len, MADV_RANDOM);  // one page per fault: no readahead batches
  struct filler fl = filler_new(frag, len / PAGE);
  for (size_t i = 0; i < len; i += PAGE) {
    uint8_t v = (uint8_t)(i >> 12) | 1;
    anon_rw[i] = v;
    anon_ro[i] = v;
    anon_cow[i] = v;
    sink += *(volatile uint8_t *)(file_ro + i);
    file_rwd[i] = v;
    sink += *(volatile uint8_t *)(file_rwc + i);
    sink += *(volatile uint8_t *)(file_priv + i);
    filler_step(&fl);
  }
  filler_free(&fl);
  mprotect(anon_ro, len, PROT_READ);
  unsigned long n = 7 * len / PAGE;
  // Only anon_cow is inherited by the child, so only it becomes COW-shared.
  uint8_t *nofork[] = {anon_rw, anon_ro, file_ro, file_rwd, file_rwc, file_priv};
  for (int i = 0; i < 6; i++) madvise(nofork[i], len, MADV_DONTFORK);
  pid_t child = fork();
  if (child < 0) die("fork");
  if (child == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;) pause();
  }
  struct { const char *name, *perms, *expect; uint8_t *p; } r[] = {
      {"anon_rw", "rw-p", "write", anon_rw},
      {"anon_ro_excl", "r--p", "read_exclusive", anon_ro},
      {"anon_cow", "rw-p", "read", anon_cow},
      {"file_ro", "r--s", "read", file_ro},
      {"file_rw_dirty", "rw-s", "write", file_rwd},
      {"file_rw_clean", "rw-s", "read", file_rwc},
      {"file_priv_ro", "rw-p", "read", file_priv},
  };
  printf("{\"ready\": true, \"pid\": %d, \"child_pid\": %d, \"regions\": [", getpid(), child);
  for (int i = 0; i < 7; i++)
    printf("%s{\"name\": \"%s\", \"start\": %lu, \"end\": %lu, \"perms\": \"%s\", \"expected_mig_type\": \"%s\"}",
           i ? ", " : "", r[i].name, (unsigned long)r[i].p, (unsigned long)r[i].p + len, r[i].perms, r[i].expect);
  printf("]}\n");
  fflush(stdout);
  wait_line();
  kill(child, SIGKILL);
  waitpid(child, NULL, 0);
  double el = now() - t0;
  printf("{\"pid\": %d, \"pages\": %lu, \"runtime_s\": %.6f, \"cpu_s\": %.6f, \"processes\": 2}\n", getpid(), n, el,
         cpu_seconds(RUSAGE_SELF));
  return 0;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the Python process that owns the cgroup
  int rc = 2;
  if (argc >= 2) {
    if (!strcmp(argv[1], "stream")) rc = mode_stream(argc, argv);
    else if (!strcmp(argv[1], "churn")) rc = mode_churn(argc, argv);
    else if (!strcmp(argv[1], "cowfork")) rc = mode_cowfork(argc, argv);
    else if (!strcmp(argv[1], "writer")) rc = mode_writer(argc, argv);
    else if (!strcmp(argv[1], "regions")) rc = mode_regions(argc, argv);
  }
  if (rc == 2) fprintf(stderr, "lrwork: bad arguments (see the comment at the top of lrwork.c)\n");
  fflush(stdout);
  return rc;
}
