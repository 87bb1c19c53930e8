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

{{/* The shardmaster replicas' addresses, comma-separated, from podAddressTemplate. */}}
{{- define "shardkv.masterPeers" -}}
{{- $svc := include "shardkv.master" . -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.shardmaster.replicas) -}}
{{- $a := $.Values.podAddressTemplate | replace "{pod}" (printf "%s-%d" $svc $i) | replace "{service}" $svc | replace "{namespace}" $.Release.Namespace | replace "{gid}" "0" | replace "{ordinal}" (toString $i) | replace "{port}" "7000" -}}
{{- $peers = append $peers $a -}}
{{- end -}}
{{ join "," $peers }}
{{- end }}
