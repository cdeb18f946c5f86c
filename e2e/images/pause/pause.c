/*
 * The sandbox ("pause") container of the test bed's pods: containerd's
 * sandbox_image points at ephemera.local/pause (e2e/scripts/images.sh), since
 * registry.k8s.io cannot be reached here.
 *
 * It holds the pod's namespaces by doing nothing: it sleeps in pause() until
 * a signal comes. As PID 1 of a pod that shares its process namespace it
 * reaps orphans (SIGCHLD); SIGTERM or SIGINT end it with status 0, which is
 * how the kubelet stops a sandbox. Built with `gcc -static`, so the image
 * needs nothing but this file.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig)
{
	(void)sig;
	_exit(0);
}

static void reap(int sig)
{
	int saved = errno;

	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved;
}

static int on(int sig, void (*handler)(int))
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	sigemptyset(&sa.sa_mask);
	/* SA_NOCLDSTOP: a stopped child is not one to reap. */
	sa.sa_flags = SA_RESTART | (sig == SIGCHLD ? SA_NOCLDSTOP : 0);
	return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv)
{
	(void)argv;
	if (argc > 1) {
		fputs("usage: pause (takes no arguments)\n", stderr);
		return 2;
	}
	if (getpid() != 1)
		fputs("pause: warning: not PID 1, orphans are reaped elsewhere\n", stderr);
	if (on(SIGTERM, stop) || on(SIGINT, stop) || on(SIGCHLD, reap)) {
		perror("pause: sigaction");
		return 1;
	}
	for (;;)
		pause();
}
