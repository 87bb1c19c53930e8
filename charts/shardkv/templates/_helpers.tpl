{{- define "shardkv.labels" -}}
app.kubernetes.io/name: shardkv
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "shardkv.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "shardkv.master" -}}
{{ .Release.Name }}-master
{{- end }}

{{/* The first n shardmaster pods' addresses, comma-separated, from
podAddressTemplate. Call with (dict "ctx" . "n" N). */}}
{{- define "shardkv.masterAddresses" -}}
{{- $ctx := .ctx -}}
{{- $svc := include "shardkv.master" $ctx -}}
{{- $peers := list -}}
{{- range $i := until (int .n) -}}
{{- $a := $ctx.Values.podAddressTemplate | replace "{pod}" (printf "%s-%d" $svc $i) | replace "{service}" $svc | replace "{namespace}" $ctx.Release.Namespace | replace "{gid}" "0" | replace "{ordinal}" (toString $i) | replace "{port}" "7000" -}}
{{- $peers = append $peers $a -}}
{{- end -}}
{{ join "," $peers }}
{{- end }}

{{/* Every shardmaster pod's address: the 7 the group may grow to. */}}
{{- define "shardkv.masterPeers" -}}
{{ include "shardkv.masterAddresses" (dict "ctx" . "n" 7) }}
{{- end }}
