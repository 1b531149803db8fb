/* The durable floor, compiled: floor_durable.py's work, fsync for fsync, without an interpreter.

   What it answers (issue 23): how much of a job's CPU and of its rate SPEC section 1's durable
   work itself costs on this machine, the kernel's part, with nothing of Python's on top. Same
   ways and the same seven fsyncs a job as floor_durable.py:

   - accept (the main thread, woken by inotify): incoming/<name> renamed into tmp/<stage>/ as
     job.yaml, read, its job_id and product.commands taken, status.json written beside it (not
     fsynced); fsync job.yaml (1), the stage (2); rename the stage to pending/<id>, fsync
     pending/ (3);
   - claim (--workers threads): rename to running/<id>, fsync running/ (4);
   - run: SHELL -c COMMANDS (product.shell, /bin/sh if none) in a session of its own, in the
     job's directory, JOB_ID in its environment, stdin /dev/null, stdout and stderr appended to
     running/<id>/log;
   - finish: fsync the log (5), the final status.json under a temporary name, fsynced (6) and
     renamed over the old one, rename to done/<id> (failed/<id>), fsync that directory (7).

   It reads only the job files the benchmarks write (bench_spool.stage_jobs: "job_id: ID" on a
   line, product a JSON object with a "commands" string and maybe a "shell"); any other is left
   in its stage and said on stderr. Built by bench_compare.py with the system's cc.

   Usage: floor_durable SPOOL [--workers N]. READY=1 to $NOTIFY_SOCKET once it watches; SIGTERM
   or SIGINT stops it after the jobs in hand. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define PATH 4096
#define ID 256

extern char **environ;

typedef struct job {
    char id[ID];
    char *commands;
    char *shell;
    struct job *next;
} job;

static char root[PATH];
static long stages;
static volatile sig_atomic_t stopping;
static job *head, *tail;
static int closed; /* no more jobs will come: the workers leave once the queue is empty */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ready = PTHREAD_COND_INITIALIZER;

static void complain(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("floor_durable: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
}

/* A path under the spool; one too long for PATH is a setup error, not a job's. */
static void spool_path(char *out, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = vsnprintf(out, PATH, format, args);
    va_end(args);
    if (n < 0 || n >= PATH) {
        complain("path too long: %s", out);
        exit(1);
    }
}

static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int result = fsync(fd);
    close(fd);
    return result;
}

static int write_new(const char *path, const char *data, int durable) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    if (fd < 0) return -1;
    size_t left = strlen(data);
    while (left > 0) {
        ssize_t written = write(fd, data, left);
        if (written < 0) {
            close(fd);
            return -1;
        }
        data += written;
        left -= (size_t)written;
    }
    int result = durable ? fsync(fd) : 0;
    close(fd);
    return result;
}

/* The value of the JSON string "key" in text, unescaped (\n, \t, \", \\, \/), with
   ``extra`` bytes to spare; NULL if there is none. */
static char *json_string(const char *text, const char *key, size_t extra) {
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\":", key);
    const char *p = strstr(text, quoted);
    if (p == NULL || (p = strchr(p + strlen(quoted), '"')) == NULL) return NULL;
    char *out = malloc(strlen(p) + extra + 1), *o = out;
    if (out == NULL) return NULL;
    for (p++; *p && *p != '"'; p++) {
        if (*p == '\\' && p[1]) {
            p++;
            *o++ = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p;
        } else {
            *o++ = *p;
        }
    }
    *o = 0;
    if (*p != '"') {
        free(out);
        return NULL;
    }
    return out;
}

/* job_id's value, product.commands (given one final newline, as floor_durable.py gives the
   script) and product.shell (/bin/sh if none). */
static int parse(const char *text, job *j) {
    const char *p = strstr(text, "job_id:");
    if (p == NULL) return -1;
    for (p += 7; *p == ' '; p++) {
    }
    size_t n = strcspn(p, " \r\n");
    if (n == 0 || n >= ID) return -1;
    memcpy(j->id, p, n);
    j->id[n] = 0;
    if ((j->commands = json_string(text, "commands", 1)) == NULL) return -1;
    strcat(j->commands, "\n");
    j->shell = json_string(text, "shell", 0);
    if (j->shell == NULL && (j->shell = strdup("/bin/sh")) == NULL) return -1;
    return 0;
}

static void forget(job *j) {
    free(j->commands);
    free(j->shell);
    free(j);
}

static void enqueue(job *j) {
    pthread_mutex_lock(&lock);
    if (tail) tail->next = j;
    else head = j;
    tail = j;
    pthread_cond_signal(&ready);
    pthread_mutex_unlock(&lock);
}

/* incoming/<name> -> pending/<id>: fsyncs 1 to 3. */
static void accept_file(const char *name) {
    char stage[PATH], file[PATH], path[PATH], text[65536], status[1024];
    spool_path(stage, "%s/tmp/in-%d-%ld", root, (int)getpid(), ++stages);
    if (mkdir(stage, 0750) < 0) {
        complain("%s: %s", stage, strerror(errno));
        return;
    }
    spool_path(file, "%s/job.yaml", stage);
    spool_path(path, "%s/incoming/%s", root, name);
    if (rename(path, file) < 0) { /* seen twice (a close and a move), or taken already */
        rmdir(stage);
        return;
    }
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    ssize_t got = fd < 0 ? -1 : read(fd, text, sizeof text - 1);
    text[got < 0 ? 0 : got] = 0;
    job *j = calloc(1, sizeof *j);
    if (got < 0 || j == NULL || parse(text, j) < 0) {
        /* left where it is, as floor_durable.py leaves one it cannot read: incoming/ would
           only bring it back */
        complain("%s: not a job file this floor reads; left as %s", name, file);
        if (fd >= 0) close(fd);
        if (j != NULL) forget(j);
        return;
    }
    int n = snprintf(status, sizeof status,
                     "{\"job_id\": \"%s\", \"state\": \"pending\", \"source\": \"%s\"}", j->id,
                     name);
    spool_path(path, "%s/status.json", stage);
    if (n >= (int)sizeof status || write_new(path, status, 0) < 0 || fsync(fd) < 0 ||
        fsync_path(stage) < 0) {
        complain("%s: %s", name, strerror(errno));
        close(fd);
        forget(j);
        return;
    }
    close(fd);
    spool_path(path, "%s/pending/%s", root, j->id);
    if (rename(stage, path) < 0) {
        complain("%s: %s", path, strerror(errno));
        forget(j);
        return;
    }
    spool_path(path, "%s/pending", root);
    fsync_path(path);
    enqueue(j);
}

/* The job's process; its exit code (127 if it could not start, 128 + a signal's number). */
static int spawn(const job *j, const char *dir, int log) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    sigset_t none, all;
    char job_id[ID + 8];
    char *argv[] = {j->shell, "-c", j->commands, NULL};
    size_t n = 0;
    while (environ[n]) n++;
    char **env = calloc(n + 2, sizeof *env);
    if (env == NULL) return 127;
    memcpy(env, environ, n * sizeof *env);
    snprintf(job_id, sizeof job_id, "JOB_ID=%s", j->id);
    env[n] = job_id;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, log, 1);
    posix_spawn_file_actions_adddup2(&actions, log, 2);
    posix_spawn_file_actions_addchdir_np(&actions, dir);
    posix_spawnattr_init(&attributes);
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attributes, &none);
    posix_spawnattr_setsigdefault(&attributes, &all);
    /* a session of its own, as spoold's jobs: not counted as the daemon's */
    posix_spawnattr_setflags(&attributes,
                             POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid;
    int code = 127, status, waited = -1;
    if (posix_spawn(&pid, argv[0], &actions, &attributes, argv, env) == 0) {
        while ((waited = waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
        }
    }
    if (waited > 0) code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    free(env);
    return code;
}

/* pending/<id> -> running/<id> -> done|failed/<id>: fsyncs 4 to 7. */
static void run(const job *j) {
    char dir[PATH], path[PATH], temporary[PATH], status[1024];
    spool_path(dir, "%s/running/%s", root, j->id);
    spool_path(path, "%s/pending/%s", root, j->id);
    if (rename(path, dir) < 0) {
        complain("%s: %s", path, strerror(errno));
        return;
    }
    spool_path(path, "%s/running", root);
    fsync_path(path);
    spool_path(path, "%s/log", dir);
    int log = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (log < 0) {
        complain("%s: %s", path, strerror(errno));
        return;
    }
    int code = spawn(j, dir, log);
    fsync(log);
    close(log);
    snprintf(status, sizeof status, "{\"job_id\": \"%s\", \"state\": \"%s\", \"exit_code\": %d}",
             j->id, code == 0 ? "succeeded" : "failed", code);
    spool_path(temporary, "%s/.status.json.tmp", dir);
    spool_path(path, "%s/status.json", dir);
    if (write_new(temporary, status, 1) < 0 || rename(temporary, path) < 0)
        complain("%s: %s", path, strerror(errno));
    const char *target = code == 0 ? "done" : "failed";
    spool_path(path, "%s/%s/%s", root, target, j->id);
    if (rename(dir, path) < 0) complain("%s: %s", path, strerror(errno));
    spool_path(path, "%s/%s", root, target);
    fsync_path(path);
}

static void *work(void *unused) {
    (void)unused;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (head == NULL && !closed) pthread_cond_wait(&ready, &lock);
        job *j = head;
        if (j != NULL && (head = j->next) == NULL) tail = NULL;
        pthread_mutex_unlock(&lock);
        if (j == NULL) return NULL;
        run(j);
        forget(j);
    }
}

static int wanted(const char *name) {
    size_t n = strlen(name);
    return n > 0 && name[0] != '.' && !(n >= 4 && strcmp(name + n - 4, ".tmp") == 0) &&
           !(n >= 5 && strcmp(name + n - 5, ".part") == 0);
}

static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

/* What incoming/ holds now, by name: at the start, and after the event queue overflowed. */
static void scan(const char *incoming) {
    struct dirent **entries;
    int n = scandir(incoming, &entries, NULL, by_name);
    for (int i = 0; i < n; i++) {
        if (wanted(entries[i]->d_name)) accept_file(entries[i]->d_name);
        free(entries[i]);
    }
    if (n >= 0) free(entries);
}

static void notify_ready(void) {
    const char *address = getenv("NOTIFY_SOCKET");
    struct sockaddr_un to = {.sun_family = AF_UNIX};
    if (address == NULL || strlen(address) >= sizeof to.sun_path) return;
    strcpy(to.sun_path, address);
    if (to.sun_path[0] == '@') to.sun_path[0] = 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return;
    sendto(fd, "READY=1", 7, 0, (struct sockaddr *)&to, sizeof to);
    close(fd);
}

static void on_stop(int signum) {
    (void)signum;
    stopping = 1;
}

int main(int argc, char **argv) {
    int flagged = argc == 4 && strcmp(argv[2], "--workers") == 0;
    int workers = flagged ? atoi(argv[3]) : 2;
    if ((argc != 2 && !flagged) || workers < 1 || workers > 64) {
        fprintf(stderr, "usage: %s SPOOL [--workers N]\n", argv[0]);
        return 2;
    }
    const char *directories[] = {"incoming", "tmp", "pending", "running", "done", "failed"};
    char incoming[PATH], path[PATH];
    spool_path(root, "%s", argv[1]);
    mkdir(root, 0750); /* its parent must be there */
    for (size_t i = 0; i < sizeof directories / sizeof *directories; i++) {
        spool_path(path, "%s/%s", root, directories[i]);
        if (mkdir(path, 0750) < 0 && errno != EEXIST) {
            complain("%s: %s", path, strerror(errno));
            return 1;
        }
    }
    struct sigaction stop = {.sa_handler = on_stop}; /* no SA_RESTART: read() returns EINTR */
    sigaction(SIGTERM, &stop, NULL);
    sigaction(SIGINT, &stop, NULL);
    spool_path(incoming, "%s/incoming", root);
    int watch = inotify_init1(IN_CLOEXEC);
    if (watch < 0 || inotify_add_watch(watch, incoming, IN_MOVED_TO | IN_CLOSE_WRITE) < 0) {
        complain("%s: %s", incoming, strerror(errno));
        return 1;
    }
    pthread_t threads[64];
    for (int i = 0; i < workers; i++) pthread_create(&threads[i], NULL, work, NULL);
    scan(incoming);
    notify_ready();
    char events[65536] __attribute__((aligned(__alignof__(struct inotify_event))));
    while (!stopping) {
        ssize_t got = read(watch, events, sizeof events);
        if (got < 0) {
            if (errno == EINTR) continue;
            complain("inotify: %s", strerror(errno));
            break;
        }
        for (char *p = events; p < events + got;) {
            struct inotify_event *event = (struct inotify_event *)p;
            if (event->mask & IN_Q_OVERFLOW) scan(incoming);
            else if (event->len > 0 && wanted(event->name)) accept_file(event->name);
            p += sizeof *event + event->len;
        }
    }
    pthread_mutex_lock(&lock);
    closed = 1;
    pthread_cond_broadcast(&ready);
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < workers; i++) pthread_join(threads[i], NULL);
    return 0;
}
