/* virtio-net feature bits the driver knows and the choice of what to accept. */
#ifndef GUEST_VIRTIO_NET_FEATURES_H
#define GUEST_VIRTIO_NET_FEATURES_H

#include "types.h"

#define VIRTIO_NET_F_CSUM           (1ULL << 0)
#define VIRTIO_NET_F_GUEST_CSUM     (1ULL << 1)
#define VIRTIO_NET_F_MTU            (1ULL << 3)
#define VIRTIO_NET_F_MAC            (1ULL << 5)
#define VIRTIO_NET_F_GUEST_TSO4     (1ULL << 7)
#define VIRTIO_NET_F_GUEST_TSO6     (1ULL << 8)
#define VIRTIO_NET_F_GUEST_ECN      (1ULL << 9)
#define VIRTIO_NET_F_GUEST_UFO      (1ULL << 10)
#define VIRTIO_NET_F_MRG_RXBUF      (1ULL << 15)
#define VIRTIO_NET_F_STATUS         (1ULL << 16)
#define VIRTIO_NET_F_CTRL_VQ        (1ULL << 17)
#define VIRTIO_NET_F_CTRL_RX        (1ULL << 18)
#define VIRTIO_NET_F_GUEST_ANNOUNCE (1ULL << 21)
#define VIRTIO_NET_F_MQ             (1ULL << 22)
#define VIRTIO_F_INDIRECT_DESC      (1ULL << 28)
#define VIRTIO_F_EVENT_IDX          (1ULL << 29)
#define VIRTIO_F_VERSION_1          (1ULL << 32)
#define VIRTIO_NET_F_GUEST_USO4     (1ULL << 54)
#define VIRTIO_NET_F_GUEST_USO6     (1ULL << 55)

/* Receive offloads that can deliver frames larger than the MTU. */
#define VIRTIO_NET_GUEST_GSO                                                          \
	(VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_UFO |   \
	 VIRTIO_NET_F_GUEST_USO4 | VIRTIO_NET_F_GUEST_USO6)

/* Every bit the driver may accept. */
#define VIRTIO_NET_DRIVER_FEATURES                                                     \
	(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU |   \
	 VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_MRG_RXBUF |             \
	 VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VIRTIO_NET_F_CTRL_VQ |               \
	 VIRTIO_NET_F_CTRL_RX | VIRTIO_NET_F_GUEST_ANNOUNCE | VIRTIO_NET_F_GUEST_ECN |      \
	 VIRTIO_NET_F_MQ | VIRTIO_NET_GUEST_GSO)

/* What to acknowledge: offered & VIRTIO_NET_DRIVER_FEATURES & allowed, then
 * minus what lacks its prerequisite (virtio 1.x 5.1.3.1): GUEST_TSO4/TSO6/
 * UFO/USO4/USO6 need GUEST_CSUM, GUEST_ECN needs GUEST_TSO4 or GUEST_TSO6,
 * CTRL_RX, GUEST_ANNOUNCE and MQ need CTRL_VQ. */
u64 virtio_net_negotiate(u64 offered, u64 allowed);

/* godwit.net_accept=<hex mask> (default: everything). */
u64 virtio_net_accept_mask(void);

#endif
