#include "virtio_net_features.h"
#include "cmdline.h"
#include "parse.h"
#include "print.h"

u64 virtio_net_negotiate(u64 offered, u64 allowed)
{
	u64 f = offered & VIRTIO_NET_DRIVER_FEATURES & allowed;

	if (!(f & VIRTIO_NET_F_GUEST_CSUM))
		f &= ~VIRTIO_NET_GUEST_GSO;
	if (!(f & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6)))
		f &= ~VIRTIO_NET_F_GUEST_ECN;
	if (!(f & VIRTIO_NET_F_CTRL_VQ))
		f &= ~(VIRTIO_NET_F_CTRL_RX | VIRTIO_NET_F_GUEST_ANNOUNCE | VIRTIO_NET_F_MQ);
	return f;
}

u64 virtio_net_accept_mask(void)
{
	struct str v;
	u64 mask;

	if (!cmdline_value("godwit.net_accept", &v))
		return ~0ULL;
	if (parse_hex(v, &mask))
		return mask;
	print_lock();
	put_str("virtio-net: ignoring godwit.net_accept=");
	put_strn_printable(v.p, v.len);
	put_str(": want a hex mask\n");
	print_unlock();
	return ~0ULL;
}
