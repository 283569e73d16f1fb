"""Drives PyKMIP (the real client, its own encoding) against a Kluis KMIP listener for the
end-to-end tests (tests/tests/kmip.rs).

Usage: python driver.py HOST PORT CA CERT KEY < steps.json

stdin is a JSON list of steps; stdout gets one JSON object per step, in order. A step that
fails inside PyKMIP is reported as {"error": "..."}, never raised, so the test sees what
happened to every step.
"""
import json
import socket
import ssl
import sys

from kmip.core import enums
from kmip.core import objects as cobjects
from kmip.core import primitives
from kmip.core.exceptions import OperationFailure
from kmip.pie.exceptions import KmipOperationFailure
from kmip.core.factories.attributes import AttributeFactory
from kmip.core.messages.contents import ProtocolVersion
from kmip.pie.client import ProxyKmipClient
from kmip.services.kmip_client import KMIPProxy

ATTRS = AttributeFactory()


def template(step):
    """The attributes of a create step, as PyKMIP builds them."""
    a = []
    if "algorithm" in step:
        a.append(ATTRS.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM,
                                        getattr(enums.CryptographicAlgorithm, step["algorithm"])))
    if "length" in step:
        a.append(ATTRS.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, step["length"]))
    a.append(ATTRS.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK,
                                    [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT]))
    if "name" in step:
        a.append(ATTRS.create_attribute(enums.AttributeType.NAME, step["name"]))
    if "app_info" in step:
        ns, data = step["app_info"]
        a.append(ATTRS.create_attribute(enums.AttributeType.APPLICATION_SPECIFIC_INFORMATION,
                                        {"application_namespace": ns, "application_data": data}))
    for name, value in step.get("extra", []):
        a.append(ATTRS.create_attribute(getattr(enums.AttributeType, name), value))
    return a


def attr_value(a):
    v = a.attribute_value
    if hasattr(v, "name_value"):
        return v.name_value.value
    if hasattr(v, "application_namespace"):
        return [v.application_namespace, v.application_data]
    v = getattr(v, "value", v)
    return getattr(v, "name", v)


def name(e):
    return None if e is None else getattr(e, "name", str(e))


def result(r):
    out = {"status": name(r.result_status.value)}
    if r.result_reason is not None:
        out["reason"] = name(r.result_reason.value)
    if r.result_message is not None:
        out["message"] = r.result_message.value
    return out


def batch_result(r):
    """A result of _process_batch_items (a *Result object of PyKMIP)."""
    out = result(r)
    for field, kind in (("operations", enums.Operation), ("object_types", enums.ObjectType)):
        v = getattr(r, field, None)
        if v is not None:
            out[field] = [kind(x.value if hasattr(x, "value") else x).name for x in v]
    v = getattr(r, "vendor_identification", None)
    if v is not None:
        out["vendor"] = v.value if hasattr(v, "value") else v
    v = getattr(r, "protocol_versions", None)
    if v is not None:
        out["versions"] = [[p.major, p.minor] for p in v]
    return out


def raw(host, port, ca, cert, key, data, read_for):
    """Sends bytes on a TLS connection of its own and reads until the server closes or one
    whole message has come (for malformed input)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    with socket.create_connection((host, port), timeout=30) as s:
        with ctx.wrap_socket(s) as t:
            t.sendall(data)
            if read_for == "close-write":
                # Half of a message, then end of input (a TCP half-close). What comes back is
                # no longer TLS-decoded, so only whether the server closes is reported.
                t.shutdown(socket.SHUT_WR)
                try:
                    while t.recv(65536):
                        pass
                except socket.timeout:
                    return {"closed": False, "timeout": True}
                except (ConnectionResetError, OSError):
                    pass
                return {"closed": True}
            got = b""
            closed = False
            while True:
                try:
                    chunk = t.recv(65536)
                except socket.timeout:
                    return {"response": got.hex(), "closed": False, "timeout": True}
                except (ConnectionResetError, ssl.SSLError):
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                got += chunk
                if len(got) >= 8:
                    want = 8 + int.from_bytes(got[4:8], "big")
                    if len(got) >= want and read_for == "one":
                        break
                    if read_for == "two" and len(got) >= want + 8:
                        second = want + 8 + int.from_bytes(got[want + 4:want + 8], "big")
                        if len(got) >= second:
                            break
            return {"response": got.hex(), "closed": closed}


def main():
    host, port, ca, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    steps = json.load(sys.stdin)
    client = KMIPProxy(
        host=host, port=port, certfile=cert, keyfile=key, ca_certs=ca,
        cert_reqs="CERT_REQUIRED", ssl_version="PROTOCOL_TLS",
        kmip_version=enums.KMIPVersion.KMIP_1_2, config_file="/dev/null",
    )
    opened = False
    for step in steps:
        op = step["op"]
        try:
            if op == "raw":
                out = raw(host, port, ca, cert, key, bytes.fromhex(step["hex"]), step.get("read", "all"))
            else:
                if not opened:
                    client.open()
                    opened = True
                if op == "discover_versions":
                    versions = [ProtocolVersion(a, b) for a, b in step.get("versions", [])] or None
                    out = batch_result(client.discover_versions(protocol_versions=versions))
                elif op == "query":
                    fs = [getattr(enums.QueryFunction, f) for f in step["functions"]]
                    out = batch_result(client.query(query_functions=fs))
                elif op == "create":
                    r = client.create(enums.ObjectType.SYMMETRIC_KEY, cobjects.TemplateAttribute(attributes=template(step)))
                    out = result(r)
                    if r.uuid is not None:
                        out["uid"] = r.uuid
                elif op == "get":
                    fmt = step.get("format")
                    from kmip.core.misc import KeyFormatType
                    r = client.get(uuid=step["uid"], key_format_type=KeyFormatType(getattr(enums.KeyFormatType, fmt)) if fmt else None)
                    out = result(r)
                    if r.secret is not None:
                        block = r.secret.key_block
                        material = block.key_value.key_material
                        out["key"] = bytes(getattr(material, "value", b"")).hex() if hasattr(material, "value") else None
                        out["format"] = block.key_format_type.value.name
                        out["algorithm"] = block.cryptographic_algorithm.value.name
                        out["length"] = block.cryptographic_length.value
                elif op == "activate":
                    out = result(client.activate(uuid=step["uid"]))
                elif op == "locate":
                    a = []
                    if "name" in step:
                        a.append(ATTRS.create_attribute(enums.AttributeType.NAME, step["name"]))
                    if "object_type" in step:
                        a.append(ATTRS.create_attribute(enums.AttributeType.OBJECT_TYPE, getattr(enums.ObjectType, step["object_type"])))
                    if "state" in step:
                        a.append(ATTRS.create_attribute(enums.AttributeType.STATE, getattr(enums.State, step["state"])))
                    if "app_info" in step:
                        ns, data = step["app_info"]
                        a.append(ATTRS.create_attribute(enums.AttributeType.APPLICATION_SPECIFIC_INFORMATION,
                                                        {"application_namespace": ns, "application_data": data}))
                    r = client.locate(attributes=a, maximum_items=step.get("max"), offset_items=step.get("offset"))
                    out = result(r)
                    out["uids"] = list(r.uuids or [])
                elif op == "get_attributes":
                    r = client.get_attributes(uuid=step["uid"], attribute_names=step.get("names"))
                    out = result(r)
                    attrs = {}
                    for a in (r.attributes or []):
                        attrs.setdefault(a.attribute_name.value, []).append(attr_value(a))
                    out["attributes"] = attrs
                elif op == "revoke":
                    import datetime
                    when = step.get("occurred")
                    r = client.revoke(getattr(enums.RevocationReasonCode, step["reason"]), uuid=step["uid"],
                                      revocation_message=step.get("message"),
                                      compromise_occurrence_date=None if when is None else primitives.DateTime(
                                          int(datetime.datetime.fromisoformat(when).timestamp()),
                                          enums.Tags.COMPROMISE_OCCURRENCE_DATE))
                    out = result(r)
                elif op == "destroy":
                    out = result(client.destroy(uuid=step["uid"]))
                elif op == "get_attribute_list":
                    r = client.get_attribute_list(uid=step["uid"])
                    out = result(r)
                    out["names"] = list(r.names or [])
                elif op.startswith("pie_"):
                    # The high-level client (kmip.pie), as applications use it.
                    pie = ProxyKmipClient(hostname=host, port=port, cert=cert, key=key, ca=ca,
                                          ssl_version="PROTOCOL_TLS", config_file="/dev/null",
                                          kmip_version=enums.KMIPVersion.KMIP_1_2)
                    with pie:
                        if op == "pie_create":
                            out = {"uid": pie.create(getattr(enums.CryptographicAlgorithm, step["algorithm"]), step["length"], name=step.get("name"))}
                        elif op == "pie_get":
                            k = pie.get(step["uid"])
                            out = {"key": bytes(k.value).hex(), "algorithm": k.cryptographic_algorithm.name, "length": k.cryptographic_length}
                        elif op == "pie_activate":
                            pie.activate(step["uid"])
                            out = {"done": True}
                        elif op == "pie_modify_attribute":
                            a = ATTRS.create_attribute(getattr(enums.AttributeType, step["name"]), step["value"], step.get("index"))
                            uid, got = pie.modify_attribute(unique_identifier=step["uid"], attribute=a)
                            out = {"uid": uid, "value": attr_value(got)}
                        elif op == "pie_delete_attribute":
                            uid, got = pie.delete_attribute(unique_identifier=step["uid"], attribute_name=step["name"],
                                                            attribute_index=step.get("index"))
                            out = {"uid": uid, "value": attr_value(got)}
                        elif op == "pie_revoke":
                            pie.revoke(getattr(enums.RevocationReasonCode, step["reason"]), step["uid"])
                            out = {"done": True}
                        elif op == "pie_destroy":
                            pie.destroy(step["uid"])
                            out = {"done": True}
                        elif op == "pie_locate":
                            a = [ATTRS.create_attribute(enums.AttributeType.NAME, step["name"])]
                            out = {"uids": pie.locate(attributes=a)}
                        else:
                            raise ValueError("unknown step " + op)
                elif op == "batch":
                    # PyKMIP's batch mode: several items in one request message.
                    client.batch_items = []
                    for item in step["items"]:
                        if item["op"] == "discover_versions":
                            client.discover_versions(batch=True)
                        elif item["op"] == "query":
                            client.query(batch=True, query_functions=[getattr(enums.QueryFunction, f) for f in item["functions"]])
                        else:
                            raise ValueError("no batch form for " + item["op"])
                    request = client._build_request_message(None, client.batch_items)
                    response = client._send_and_receive_message(request)
                    client.batch_items = []
                    out = {"items": [batch_result(r) for r in client._process_batch_items(response)]}
                elif op == "create_key_pair":
                    # The raw client: the three Template-Attributes as the step gives them. Key
                    # generation takes seconds for RSA-4096: no 30-second socket timeout for it.
                    client.socket.settimeout(300)
                    def tmpl(key, tag):
                        t = step.get(key)
                        return None if t is None else cobjects.TemplateAttribute(attributes=template(t), tag=tag)
                    r = client.create_key_pair(
                        common_template_attribute=tmpl("common", enums.Tags.COMMON_TEMPLATE_ATTRIBUTE),
                        private_key_template_attribute=tmpl("private", enums.Tags.PRIVATE_KEY_TEMPLATE_ATTRIBUTE),
                        public_key_template_attribute=tmpl("public", enums.Tags.PUBLIC_KEY_TEMPLATE_ATTRIBUTE))
                    out = result(r)
                    if r.private_key_uuid is not None:
                        out["private"] = r.private_key_uuid
                        out["public"] = r.public_key_uuid
                elif op == "get_key":
                    # Get of any key or secret data: the material, its format and what PyKMIP read.
                    from kmip.core.misc import KeyFormatType
                    fmt = step.get("format")
                    r = client.get(uuid=step["uid"], key_format_type=KeyFormatType(getattr(enums.KeyFormatType, fmt)) if fmt else None)
                    out = result(r)
                    if r.secret is not None:
                        out["object_type"] = name(r.object_type)
                        block = r.secret.key_block
                        out["key"] = bytes(block.key_value.key_material.value).hex()
                        out["format"] = block.key_format_type.value.name
                        if block.cryptographic_algorithm is not None:
                            out["algorithm"] = block.cryptographic_algorithm.value.name
                        if block.cryptographic_length is not None:
                            out["length"] = block.cryptographic_length.value
                        if getattr(r.secret, "secret_data_type", None) is not None:
                            out["secret_data_type"] = r.secret.secret_data_type.value.name
                elif op == "register":
                    # The raw client with a Key Block built as PyKMIP's object factory builds it,
                    # but from the step's bytes, format, algorithm and length as given (so a
                    # mismatch reaches the server).
                    from kmip.core import attributes as cattributes, misc, secrets
                    kind = getattr(enums.ObjectType, step["object_type"])
                    material = bytes.fromhex(step["key"])
                    block = cobjects.KeyBlock(
                        key_format_type=misc.KeyFormatType(getattr(enums.KeyFormatType, step["format"])),
                        key_compression_type=None,
                        key_value=cobjects.KeyValue(cobjects.KeyMaterial(material)),
                        cryptographic_algorithm=cattributes.CryptographicAlgorithm(getattr(enums.CryptographicAlgorithm, step["key_algorithm"])) if "key_algorithm" in step else None,
                        cryptographic_length=cattributes.CryptographicLength(step["key_length"]) if "key_length" in step else None,
                        key_wrapping_data=None)
                    if kind == enums.ObjectType.SECRET_DATA:
                        secret = secrets.SecretData(secrets.SecretData.SecretDataType(getattr(enums.SecretDataType, step["secret_data_type"])), block)
                    else:
                        secret = {enums.ObjectType.SYMMETRIC_KEY: secrets.SymmetricKey, enums.ObjectType.PRIVATE_KEY: secrets.PrivateKey,
                                  enums.ObjectType.PUBLIC_KEY: secrets.PublicKey}[kind](block)
                    r = client.register(kind, cobjects.TemplateAttribute(attributes=template(step.get("template", {}))), secret)
                    out = result(r)
                    if r.uuid is not None:
                        out["uid"] = r.uuid
                elif op.startswith("pie2_"):
                    # The high-level client for key pairs and registered objects.
                    from kmip.pie import objects as pobjects
                    pie = ProxyKmipClient(hostname=host, port=port, cert=cert, key=key, ca=ca,
                                          ssl_version="PROTOCOL_TLS", config_file="/dev/null",
                                          kmip_version=enums.KMIPVersion.KMIP_1_2)
                    with pie:
                        pie.proxy.socket.settimeout(300)
                        if op == "pie2_create_key_pair":
                            public, private = pie.create_key_pair(enums.CryptographicAlgorithm.RSA, step["length"],
                                                                  public_name=step.get("public_name"), private_name=step.get("private_name"))
                            out = {"public": public, "private": private}
                        elif op == "pie2_get":
                            o = pie.get(step["uid"])
                            out = {"object_type": o.object_type.name, "key": bytes(o.value).hex()}
                            for field in ("key_format_type", "cryptographic_algorithm", "data_type"):
                                v = getattr(o, field, None)
                                if v is not None:
                                    out[field] = v.name
                            if getattr(o, "cryptographic_length", None) is not None:
                                out["length"] = o.cryptographic_length
                        elif op == "pie2_register":
                            value = bytes.fromhex(step["key"])
                            if step["object_type"] == "PRIVATE_KEY":
                                o = pobjects.PrivateKey(enums.CryptographicAlgorithm.RSA, step["length"], value, getattr(enums.KeyFormatType, step["format"]))
                            elif step["object_type"] == "PUBLIC_KEY":
                                o = pobjects.PublicKey(enums.CryptographicAlgorithm.RSA, step["length"], value, getattr(enums.KeyFormatType, step["format"]))
                            elif step["object_type"] == "SYMMETRIC_KEY":
                                o = pobjects.SymmetricKey(enums.CryptographicAlgorithm.AES, step["length"], value)
                            else:
                                o = pobjects.SecretData(value, getattr(enums.SecretDataType, step["secret_data_type"]))
                            if "name" in step:
                                o.names = [step["name"]]
                            out = {"uid": pie.register(o)}
                        else:
                            raise ValueError("unknown step " + op)
                else:
                    raise ValueError("unknown step " + op)
        except (KmipOperationFailure, OperationFailure) as e:  # the high-level client's form of a failed result
            out = {"status": name(e.status), "reason": name(e.reason), "message": getattr(e, "message", str(e))}
        except Exception as e:  # reported to the test, which decides
            out = {"error": "%s: %s" % (type(e).__name__, e)}
        print(json.dumps(out), flush=True)
    if opened:
        client.close()


if __name__ == "__main__":
    main()
