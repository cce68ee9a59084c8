/* A C node (erl_interface's ei) for tests/test_clients.py.
 *
 *   cnode NAME COOKIE listen       ei_listen on a port the system picks,
 *                                  then ei_publish(port)
 *   cnode NAME COOKIE fixed PORT   the older way of OTP's C node tutorial:
 *                                  its own socket bound to PORT, then
 *                                  ei_publish(PORT)
 *
 * ei finds epmd on $ERL_EPMD_PORT.  Prints "NODE <full name> <port>", then
 * serves every connection it accepts (ei_accept): a message to the
 * registered name "cecho", {Pid, Msg}, is answered with {cecho, Msg}, and
 * net_kernel's {'$gen_call', {From, Ref}, {is_auth, Node}} (what
 * net_adm:ping sends; ei does not answer it by itself) with {Ref, yes}.
 * Commands on stdin, one a line, each printing one line:
 *
 *   connect NODE   ei_connect (PORT_PLEASE2 to epmd, then the handshake):
 *                  "CONNECTED NODE" or "CONNECT NODE failed <erl_errno>"
 *   ping NODE      net_adm:ping's request to NODE's net_kernel over that
 *                  connection: "PING NODE pong" or "PING NODE pang"
 *   echo NODE      {self(), hello_from_c} to {echo, NODE}: "ECHO <reply>"
 *                  or "ECHO none" after 10 s
 *   quit           exits (the epmd connection closes with it)
 *
 * End of input does the same as quit.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ei.h"

#define MAXFD 64

static ei_cnode ec;
static struct pollfd fds[MAXFD];
static int nfds;
static char peers[MAXFD][MAXATOMLEN_UTF8 * 2 + 2];

static void say(const char *fmt, const char *a, const char *b)
{
    printf(fmt, a, b);
    printf("\n");
    fflush(stdout);
}

static int add_fd(int fd, const char *peer)
{
    if (nfds == MAXFD)
        return -1;
    fds[nfds].fd = fd;
    fds[nfds].events = POLLIN;
    snprintf(peers[nfds], sizeof peers[nfds], "%s", peer);
    return nfds++;
}

static void drop_fd(int i)
{
    ei_close_connection(fds[i].fd);
    fds[i] = fds[nfds - 1];
    memcpy(peers[i], peers[nfds - 1], sizeof peers[i]);
    nfds--;
}

/* Answer one message that arrived on fd (a registered send). */
static void serve(int fd, erlang_msg *msg, ei_x_buff *x)
{
    int index = 0, version, arity, start, end;
    char atom[MAXATOMLEN_UTF8];
    erlang_pid from;
    ei_x_buff out;

    if (msg->msgtype != ERL_REG_SEND || ei_decode_version(x->buff, &index, &version) < 0)
        return;
    if (strcmp(msg->toname, "cecho") == 0) {
        /* {Pid, Msg} -> Pid ! {cecho, Msg} */
        if (ei_decode_tuple_header(x->buff, &index, &arity) < 0 || arity != 2
            || ei_decode_pid(x->buff, &index, &from) < 0)
            return;
        start = index;
        if (ei_skip_term(x->buff, &index) < 0)
            return;
        end = index;
        ei_x_new_with_version(&out);
        ei_x_encode_tuple_header(&out, 2);
        ei_x_encode_atom(&out, "cecho");
        ei_x_append_buf(&out, x->buff + start, end - start);
        ei_send(fd, &from, out.buff, out.index);
        ei_x_free(&out);
    } else if (strcmp(msg->toname, "net_kernel") == 0) {
        /* {'$gen_call', {From, Ref}, {is_auth, Node}} -> From ! {Ref, yes} */
        if (ei_decode_tuple_header(x->buff, &index, &arity) < 0 || arity != 3
            || ei_decode_atom(x->buff, &index, atom) < 0 || strcmp(atom, "$gen_call") != 0
            || ei_decode_tuple_header(x->buff, &index, &arity) < 0 || arity != 2
            || ei_decode_pid(x->buff, &index, &from) < 0)
            return;
        start = index;  /* a reference, or [alias | Ref] since OTP 24 */
        if (ei_skip_term(x->buff, &index) < 0)
            return;
        end = index;
        ei_x_new_with_version(&out);
        ei_x_encode_tuple_header(&out, 2);
        ei_x_append_buf(&out, x->buff + start, end - start);
        ei_x_encode_atom(&out, "yes");
        ei_send(fd, &from, out.buff, out.index);
        ei_x_free(&out);
    }
}

/* Wait up to 10 s for a message sent to this node's pid on fd; serve any
 * registered send meanwhile.  Returns 1 with the message in x, or 0. */
static int await_reply(int fd, erlang_msg *msg, ei_x_buff *x)
{
    int i;
    for (i = 0; i < 100; i++) {
        x->index = 0;
        switch (ei_xreceive_msg_tmo(fd, msg, x, 10000)) {
        case ERL_TICK:
            continue;
        case ERL_MSG:
            if (msg->msgtype == ERL_SEND)
                return 1;
            serve(fd, msg, x);
            continue;
        default:
            return 0;
        }
    }
    return 0;
}

static int fd_of(const char *node)
{
    int i;
    for (i = 2; i < nfds; i++)
        if (strcmp(peers[i], node) == 0)
            return fds[i].fd;
    return -1;
}

static void command(char *line)
{
    char *cmd = strtok(line, " \r\n"), *node = strtok(NULL, " \r\n");
    char errbuf[32], *text = NULL;
    int fd, index, version, arity;
    erlang_msg msg;
    erlang_ref ref;
    ei_x_buff out, in;

    if (cmd == NULL)
        return;
    if (strcmp(cmd, "quit") == 0)
        exit(0);
    if (node == NULL)
        return;
    if (strcmp(cmd, "connect") == 0) {
        fd = ei_connect(&ec, node);
        if (fd < 0) {
            snprintf(errbuf, sizeof errbuf, "%d", erl_errno);
            say("CONNECT %s failed %s", node, errbuf);
        } else {
            add_fd(fd, node);
            say("CONNECTED %s%s", node, "");
        }
        return;
    }
    fd = fd_of(node);
    ei_x_new(&in);
    ei_x_new_with_version(&out);
    if (strcmp(cmd, "ping") == 0) {
        ei_make_ref(&ec, &ref);
        ei_x_encode_tuple_header(&out, 3);
        ei_x_encode_atom(&out, "$gen_call");
        ei_x_encode_tuple_header(&out, 2);
        ei_x_encode_pid(&out, ei_self(&ec));
        ei_x_encode_ref(&out, &ref);
        ei_x_encode_tuple_header(&out, 2);
        ei_x_encode_atom(&out, "is_auth");
        ei_x_encode_atom(&out, ei_thisnodename(&ec));
        if (fd >= 0 && ei_reg_send(&ec, fd, "net_kernel", out.buff, out.index) == 0
            && await_reply(fd, &msg, &in)) {
            char yes[MAXATOMLEN_UTF8] = "";
            index = 0;
            ei_decode_version(in.buff, &index, &version);
            if (ei_decode_tuple_header(in.buff, &index, &arity) == 0 && arity == 2
                && ei_skip_term(in.buff, &index) == 0 && ei_decode_atom(in.buff, &index, yes) == 0
                && strcmp(yes, "yes") == 0) {
                say("PING %s %s", node, "pong");
                goto done;
            }
        }
        say("PING %s %s", node, "pang");
    } else if (strcmp(cmd, "echo") == 0) {
        ei_x_encode_tuple_header(&out, 2);
        ei_x_encode_pid(&out, ei_self(&ec));
        ei_x_encode_atom(&out, "hello_from_c");
        if (fd >= 0 && ei_reg_send(&ec, fd, "echo", out.buff, out.index) == 0
            && await_reply(fd, &msg, &in)) {
            index = 0;
            ei_decode_version(in.buff, &index, &version);
            if (ei_s_print_term(&text, in.buff, &index) >= 0) {
                say("ECHO %s%s", text, "");
                free(text);
                goto done;
            }
        }
        say("ECHO none%s%s", "", "");
    }
done:
    ei_x_free(&in);
    ei_x_free(&out);
}

int main(int argc, char **argv)
{
    int lfd, port = 0, one = 1, i, fd;
    struct sockaddr_in addr;
    ErlConnect conn;
    erlang_msg msg;
    ei_x_buff x;
    char line[512], portbuf[16];

    if (argc < 4 || (strcmp(argv[3], "fixed") == 0 && argc < 5)) {
        fprintf(stderr, "usage: cnode NAME COOKIE listen | cnode NAME COOKIE fixed PORT\n");
        return 2;
    }
    setvbuf(stdin, NULL, _IOLBF, 0);
    ei_init();
    if (ei_connect_init(&ec, argv[1], argv[2], 0) < 0) {
        fprintf(stderr, "ei_connect_init failed\n");
        return 1;
    }
    if (strcmp(argv[3], "fixed") == 0) {
        port = atoi(argv[4]);
        lfd = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        memset(&addr, 0, sizeof addr);
        addr.sin_family = AF_INET;
        addr.sin_port = htons(port);
        addr.sin_addr.s_addr = htonl(INADDR_ANY);
        if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 5) < 0) {
            perror("listen");
            return 1;
        }
    } else if ((lfd = ei_listen(&ec, &port, 5)) < 0) {
        fprintf(stderr, "ei_listen failed: %d\n", erl_errno);
        return 1;
    }
    if (ei_publish(&ec, port) < 0) {
        fprintf(stderr, "ei_publish failed: %d\n", erl_errno);
        return 1;
    }
    snprintf(portbuf, sizeof portbuf, "%d", port);
    say("NODE %s %s", ei_thisnodename(&ec), portbuf);

    add_fd(0, "");
    add_fd(lfd, "");
    ei_x_new(&x);
    for (;;) {
        if (poll(fds, nfds, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (fds[0].revents) {
            if (fgets(line, sizeof line, stdin) == NULL)
                return 0;
            command(line);
            continue;
        }
        if (fds[1].revents) {
            fd = ei_accept(&ec, lfd, &conn);
            if (fd >= 0)
                add_fd(fd, conn.nodename);
            continue;
        }
        for (i = 2; i < nfds; i++) {
            if (!fds[i].revents)
                continue;
            x.index = 0;
            switch (ei_xreceive_msg(fds[i].fd, &msg, &x)) {
            case ERL_TICK:
                break;
            case ERL_MSG:
                serve(fds[i].fd, &msg, &x);
                break;
            default:
                drop_fd(i);
                break;
            }
            break;
        }
    }
}
